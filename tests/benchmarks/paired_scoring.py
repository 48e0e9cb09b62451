"""Two versions of the scoring engine on the same input, in paired rounds.

    .venv/bin/python -m tests.benchmarks.paired_scoring OLD.py NEW.py [--rows N] [--rounds R]

Each file is a module that defines `score_files` and `input_files` (e.g. a copy of
`components/scoring/engine.py` that imports the rest of the package).

On a shared 2-vCPU machine a run's time drifts by 20-30% within minutes, so timings taken
minutes apart cannot tell a 5% change. Here each version runs in its own process (its
own heap and allocator state, which a single process alternating two module copies would
share) and the two take turns, swapping the order every round; each round runs
`mlflow.pyfunc` before the version, as the benchmark does. What is compared is the
per-round ratio of NEW to OLD, whose drift cancels out. Each version's CPU time over all
its threads is printed too: a change can save CPU and still lose time to a worse schedule.

Keep a copy of the old module first, e.g.
`git show HEAD:components/scoring/engine.py > old.py`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

WORKER = "--worker"


def worker(module_path: str, source: Path, folder: Path) -> None:
    """Load the version and the model, then run one round per line read from stdin."""
    import importlib.util

    import mlflow

    from stemma.components.scoring import engine as scoring
    from tests.benchmarks import bench_scoring as bench
    from tests.support import isolated_mlflow

    spec = importlib.util.spec_from_file_location("stemma.components._paired", module_path)
    assert spec is not None and spec.loader is not None
    version = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = version
    spec.loader.exec_module(version)
    with isolated_mlflow():
        model = scoring.load_scoring_model(bench.register_model(folder / uuid.uuid4().hex))
        pyfunc_model = mlflow.pyfunc.load_model(model.model_uri, suppress_warnings=True)
    print("ready", flush=True)
    for _ in sys.stdin:
        shutil.rmtree(folder / "pyfunc", ignore_errors=True)
        bench.run_pyfunc(pyfunc_model, source, folder / "pyfunc")
        shutil.rmtree(folder / "out", ignore_errors=True)
        bench.as_new(source)
        started, cpu = time.perf_counter(), time.process_time()
        version.score_files(
            model,
            version.input_files(source),
            folder / "out",
            id_column=bench.ID,
            chunk_rows=bench.CHUNK_ROWS,
            progress=False,
        )
        print(time.perf_counter() - started, time.process_time() - cpu, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()

    from tests.benchmarks import bench_scoring as bench

    with tempfile.TemporaryDirectory(prefix="stemma-paired-") as scratch:
        root = Path(scratch)
        source = bench.write_input(root / "input.parquet", arguments.rows, seed=1)
        versions = {"old": arguments.old, "new": arguments.new}
        processes = {}
        for name, path in versions.items():
            (root / name).mkdir()
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", __spec__.name, WORKER, path, str(source), str(root / name)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        for process in processes.values():
            assert process.stdout is not None
            while process.stdout.readline().strip() != "ready":
                if process.poll() is not None:
                    raise SystemExit(f"a worker exited with {process.returncode}")
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        cpu: dict[str, list[float]] = {name: [] for name in versions}
        for round_index in range(arguments.rounds + 1):  # the first round warms up
            order = ["old", "new"] if round_index % 2 == 0 else ["new", "old"]
            for name in order:
                process = processes[name]
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write("go\n")
                process.stdin.flush()
                wall, busy = map(float, process.stdout.readline().split())
                seconds[name].append(wall)
                cpu[name].append(busy)
        for process in processes.values():
            assert process.stdin is not None
            process.stdin.close()
            process.wait()

    old, new = seconds["old"][1:], seconds["new"][1:]
    ratios = [n / o for o, n in zip(old, new, strict=True)]
    for name, values in (("old", old), ("new", new)):
        print(
            f"{name}: median {1000 * statistics.median(values):.1f} ms, "
            f"min {1000 * min(values):.1f} ms; CPU (all threads) median "
            f"{1000 * statistics.median(cpu[name][1:]):.1f} ms"
        )
    faster = sum(ratio < 1 for ratio in ratios)
    print(
        f"new/old per round: median {statistics.median(ratios):.3f}; "
        f"new faster in {faster} of {len(ratios)} rounds"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
