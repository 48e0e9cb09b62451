"""Print the code-shape numbers of the redesign and exit non-zero when one fails.

Checks (``make shape`` runs them all):

- no module in ``components/`` over :data:`MAX_MODULE_LINES` lines;
- no function in ``components/`` or ``flows/`` over :data:`MAX_FUNCTION_LINES` lines
  (from its ``def`` to its last line; methods and nested functions count on their own);
- no import of another module's ``_private`` name: ``from x import _name``, ``import
  x._module``, or ``alias._name`` where ``alias`` is an imported module;
- the lines of ``components/**/*.py`` do not grow past :data:`COMPONENT_LINES_CEILING`
  (a ratchet: lower it as the lines fall; the report also prints the distance to
  :data:`BASELINE_COMPONENT_LINES`, the count before the redesign);
- the import contract of ``pyproject.toml`` passes (``lint-imports``; ``--no-contract``
  skips it).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80
#: Lines of components/**/*.py before the redesign (commit 7dfbd90~1), less the worked
#: example's generator (components/example.py, 315 lines, now examples/credit.py outside
#: components/); they must not grow.
BASELINE_COMPONENT_LINES = 24_126
#: The most lines components/**/*.py may hold now: it goes down whenever code is removed,
#: and up only by the lines of a new feature, said in the commit that adds it. The
#: redesign left it at 25,353; since then: run descriptions (platform/describe.py and their
#: Prefect copy) 228, the column names `validate` checks 63, the registry's text
#: (registry/text.py) 143, the lineage summary (lineage/graph.py render_summary, key
#: metrics of runs in lineage/index.py) 238, deployment titles and descriptions 48, nested
#: runs 12, the inputs a run's record names linked as MLflow run inputs 38, champion moves
#: made outside Stemma detected 55, the champion history (registry/history.py) 107, Data
#: Docs offline and naming their data and run 36, the lineage picture (lineage/picture.py)
#: 143, the lineage index in two tags (with the search of older stores' per-node tags) 115,
#: lineage times that run forward 8, metrics in sections (platform/metric_names.py, and the
#: flat names older runs carry) 204, the online endpoint (components/serving/ and the spec's
#: endpoint section) 1,504, at most 12 documented tags per run and per version (the facts
#: moved to lineage records and read back with fallbacks to older stores' tags) 345, the
#: decision records' own module 10, the endpoint's offline /docs 4; less 16 lines of the
#: old version-tag layout removed. Then the endpoint's prediction log and labels route
#: (serving/predlog.py, logstore.py, labels.py, the spec's endpoint.log) 1,245; live canary
#: routing and live shadow (registry/routing.py, serving/routing.py, shadow.py, the watch of
#: aliases and canary state) 887; the log as the monitor's and retraining's input and the
#: log monitor's deployment (data/prediction_log.py and its readers) 537; shadow and canary
#: judged from the log (evaluation/live.py, log_rows.py) 872; less 5 lines of the endpoint's
#: routing and shadow sharing one encoder check (rows.encode_for). Then multiclass and label
#: maps (the preprocessor's classes and label map, softmax training and its metrics, the
#: gate, scoring, the endpoint, shadow, canary, quantization and retraining on classes)
#: 1,551; `stemma init` (data/inference.py, starter_spec.py, project.py) and the tracked-data
#: check 1,204; drift defaults that hold on any batch size, with predicted-class and label
#: drift 485; custom modules carried with the model 336; metric limits relative or absolute
#: (spec/limits.py) and narrow scoring in its own folder 367; `stemma up` without MLflow's
#: job processes 7. Then compression and cost: the spec's compress and cost sections
#: (spec/compress.py) 349; the standard latency probe (runtime/probe.py) 230; latency and
#: cost per model version, variants too (registry/latency.py, its block in registry/text.py)
#: 401; every scoring run's CPU time and cost (scoring/cost.py, workers' clocks in job.py) 166;
#: structured pruning (compression/pruning.py, narrowed Linears in model/networks.py) 530;
#: distillation (compression/distillation.py) 565; the compress gate (compression/
#: variants.py, the recomputed training splits) 439; one comparison of every variant, its
#: plot and its GPU rows (compression/comparison.py, comparison_report.py, plots.py, gpu.py)
#: 1,012; serving the cheapest variant in batch and online (quantization/registering.py,
#: serving/) 177; the tags, metric sections and network config they use 18; less 6 lines
#: of latency columns built three times (LatencyProfile.percentiles) and a copied reference.
#: Then 325 lines less from code written twice made one (one git runner, one run-artifact
#: reader, one health check, one gate for quantized and compressed variants, one shadow
#: fact set, one body schema for the endpoint's routes, ...) and dead branches removed;
#: then 5 lines for the shadow's row scores built from named parts (mypy passes again), and
#: 4 for a missing run artifact told apart from an unreadable one by a check, not a parse.
COMPONENT_LINES_CEILING = 39_688
#: Offenders printed per check.
SHOWN = 40


@dataclass
class Check:
    """One number of the code shape, and what makes it fail."""

    name: str
    value: int
    limit: int
    offenders: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.value <= self.limit


def python_files(*folders: str) -> list[Path]:
    """The ``.py`` files under ``folders`` (relative to the repository root), sorted."""
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_modules(files: list[Path]) -> list[tuple[str, int]]:
    """Modules over the line limit, longest first."""
    sizes = [(relative(path), line_count(path)) for path in files]
    return sorted(
        ((name, size) for name, size in sizes if size > MAX_MODULE_LINES),
        key=lambda item: -item[1],
    )


def long_functions(files: list[Path]) -> list[tuple[str, int]]:
    """Functions over the line limit as ``path:line name``, longest first."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append((f"{relative(path)}:{node.lineno} {node.name}", length))
    return sorted(found, key=lambda item: -item[1])


def is_private(name: str) -> bool:
    """``_name`` but not ``__dunder__``."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path) -> str:
    """The dotted name ``stemma.<folder>.<...>`` of a file under components/ or flows/."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["stemma", *parts])


def absolute_module(path: Path, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def is_stdlib(module: str) -> bool:
    """The standard library's ``_thread`` and ``os._exit`` are public, despite the name."""
    return module.split(".")[0] in sys.stdlib_module_names


def private_imports(files: list[Path]) -> list[str]:
    """Uses of another module's ``_private`` names, as ``path:line what``."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules: set[str] = set()  # names bound to imported modules
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if is_stdlib(alias.name):
                        continue
                    if any(is_private(part) for part in alias.name.split(".")):
                        found.append(f"{relative(path)}:{node.lineno} import {alias.name}")
                    modules.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                source = absolute_module(path, node)
                if is_stdlib(source):
                    continue
                private_module = any(is_private(part) for part in source.split("."))
                for alias in node.names:
                    if private_module or is_private(alias.name):
                        found.append(
                            f"{relative(path)}:{node.lineno} from {source} import {alias.name}"
                        )
                    if alias.name[:1].islower():  # maybe a module: `from pkg import module`
                        modules.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and is_private(node.attr)
            ):
                found.append(f"{relative(path)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def contract() -> Check:
    """The import contract (``lint-imports``): 0 when it passes, 1 when it breaks."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if command is None:
        return Check("import contract (lint-imports not installed)", 1, 0)
    done = subprocess.run(
        [command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    broken = [line for line in done.stdout.splitlines() if "BROKEN" in line]
    return Check("import contract broken", int(done.returncode != 0), 0, broken)


def measure(*, with_contract: bool = True) -> list[Check]:
    """Every check of the code shape."""
    components = python_files("components")
    code = components + python_files("examples") + python_files("flows")
    modules = long_modules(components)
    functions = long_functions(code)
    privates = private_imports(code)
    lines = sum(line_count(path) for path in components)
    checks = [
        Check(
            f"modules in components/ over {MAX_MODULE_LINES} lines",
            len(modules),
            0,
            [f"{name} ({size})" for name, size in modules],
        ),
        Check(
            f"functions in components/ and flows/ over {MAX_FUNCTION_LINES} lines",
            len(functions),
            0,
            [f"{name} ({size})" for name, size in functions],
        ),
        Check("imports of another module's _private names", len(privates), 0, privates),
        Check(
            f"lines in components/ ({lines - BASELINE_COMPONENT_LINES:+,} against the "
            f"{BASELINE_COMPONENT_LINES:,} before the redesign)",
            lines,
            COMPONENT_LINES_CEILING,
        ),
    ]
    if with_contract:
        checks.append(contract())
    return checks


def report(checks: list[Check]) -> str:
    """The checks as text: one line each, then the offenders of each failing one."""
    lines = []
    for check in checks:
        verdict = "ok  " if check.passed else "FAIL"
        lines.append(f"{verdict} {check.name}: {check.value:,} (limit {check.limit:,})")
        if not check.passed:
            lines += [f"       {offender}" for offender in check.offenders[:SHOWN]]
            if len(check.offenders) > SHOWN:
                lines.append(f"       ... and {len(check.offenders) - SHOWN} more")
    failed = sum(not check.passed for check in checks)
    lines.append(
        f"code shape: {failed} of {len(checks)} checks failed" if failed else "code shape: ok"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-contract", action="store_true", help="skip lint-imports")
    arguments = parser.parse_args(argv)
    checks = measure(with_contract=not arguments.no_contract)
    print(report(checks))
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
