"""Rebuilding a registered model from its lineage, and judging the rebuild.

A version registered by the training flow names everything that made it: the training run
(its ``run_id``; ``stemma.run_id`` in older stores), the data version (``stemma.data.md5``;
the pointer is in the run's lineage record), the resolved spec with its seeds (the run's
``spec/resolved.yaml``), the code revision (the run's ``stemma.git.rev`` and record), and
what came out (``stemma.weights.sha256``, the ``test/*`` metrics). This module reads those facts (:func:`plan_reproduction`),
restores the exact data bytes through DVC (:func:`restore_data_version`), says how the code
differs (:func:`code_revision_warnings`, and for a custom architecture whose module the
model carries, :func:`network_code_warnings`), and compares a retrained model with the recorded
one tensor by tensor and metric by metric, and every file of the model folder with the
digests recorded at registration (:func:`recorded_file_problems`,
:func:`compare_model_files`) (:func:`judge`). Retraining itself is the
training flow's job; :mod:`stemma.flows.reproduce` runs it in an isolated store.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stemma.components.data.tables import dir_md5, file_md5
from stemma.components.errors import DataVersionError, LineageError
from stemma.components.lineage.index import RecordIndex
from stemma.components.lineage.resolve import pointer_out, read_pointer_at, resolve_reference
from stemma.components.platform import metric_names
from stemma.components.platform import tags as tag_names
from stemma.components.platform.tracking import git_revision, read_run_artifact, run_git

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Artifact of a training run holding the spec after overrides and defaults.
SPEC_ARTIFACT = "spec/resolved.yaml"
#: The weights file inside a logged model.
WEIGHTS_FILE = "weights.safetensors"
#: Run metrics compared besides the ``test/*`` ones.
COMPARED_METRICS = (metric_names.TRAIN_BEST_EPOCH, metric_names.TRAIN_EPOCHS_RUN)
#: The validation digest's tag, on the version and on a rebuild's run.
CHECKS_TAG = tag_names.CHECKS_DIGEST
#: How many changed files a code warning names before it summarises.
MAX_FILES_NAMED = 10
#: MLmodel keys that name the run, the logged model or the moment, not the model: a
#: rebuild differs there by construction.
VOLATILE_MLMODEL_KEYS = ("artifact_path", "model_id", "model_uuid", "run_id", "utc_time_created")
#: The reference profile's field holding when it was built.
VOLATILE_PROFILE_KEYS = ("created",)


@dataclass(frozen=True)
class ReproductionPlan:
    """What a registered version was made from, as its lineage records it.

    Attributes:
        model_uri: ``models:/<name>/<version>``.
        run_id: the training run.
        spec_yaml: the resolved spec the run logged.
        data_pointer: the DVC file (``data.dvc``).
        data_md5: the data version it recorded.
        data_out: the folder or file the DVC file tracks, relative to the project root.
        git_rev: the project's commit when it trained (None outside git).
        git_dirty: whether tracked files differed from that commit.
        weights_sha256: the weights file's sha256.
        checks_digest: the Great Expectations result's digest.
        metrics: ``test/*`` metrics and :data:`COMPARED_METRICS` of the run, by their
            sectioned names whichever Stemma logged them.
        device: the device the run trained on (``cpu``, ``cuda``).
    """

    model_uri: str
    model_name: str
    version: str
    run_id: str
    spec_yaml: str
    data_pointer: str
    data_md5: str
    data_out: str
    git_rev: str | None
    git_dirty: bool
    weights_sha256: str
    checks_digest: str | None
    metrics: dict[str, float]
    device: str | None
    model_files: dict[str, str] | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return dict(yaml.safe_load(self.spec_yaml) or {})

    @property
    def architecture(self) -> str:
        """The spec's ``model.architecture`` (``mlp`` when it names none)."""
        return str((self.spec.get("model") or {}).get("architecture") or "mlp")

    @property
    def code_files(self) -> dict[str, str]:
        """The project code the model carries (``code/`` of its manifest), by path."""
        from stemma.components.model.artifact import carried_code

        return carried_code(self.model_files or {})

    @property
    def seeds(self) -> dict[str, Any]:
        """The seeds in the spec: training (initial weights, batches) and the split."""
        spec = self.spec
        return {
            "train.seed": (spec.get("train") or {}).get("seed"),
            "data.split.seed": ((spec.get("data") or {}).get("split") or {}).get("seed"),
        }


def _version_for(client: MlflowClient, reference: str) -> Any:
    from mlflow.exceptions import MlflowException

    text = reference.strip()
    if not text.startswith("models:/"):
        # A training run id: the version it registered.
        found = client.search_model_versions(f"run_id = '{text}'") if text.isalnum() else []
        if not found:
            raise LineageError(
                f"{reference!r}: not a model version Stemma can reproduce",
                [
                    "give models:/<name>/<version> or models:/<name>@<alias>, or the id of a "
                    "training run that registered a version"
                ],
            )
        return found[0]
    node = resolve_reference(text, RecordIndex(client), Path.cwd())
    name, _, version = node.removeprefix("models:/").rpartition("/")
    try:
        return client.get_model_version(name, version)
    except MlflowException as error:  # resolve_reference checked it exists
        raise LineageError(f"{node}: cannot read it", [str(error)]) from error


def plan_reproduction(client: MlflowClient, reference: str) -> ReproductionPlan:
    """Read what made a registered version from its tags, its run and the run's spec.

    Raises:
        LineageError: the reference names no version, or the version lacks the lineage
            needed to rebuild it (the message lists what is missing).
    """
    from mlflow.exceptions import MlflowException

    entry = _version_for(client, reference)
    model_uri = f"models:/{entry.name}/{entry.version}"
    tags = dict(entry.tags or {})
    # Versions of older Stemma versions name their run in a tag; newer ones by run_id only.
    run_id = tags.get(tag_names.RUN_ID) or entry.run_id
    missing = [] if run_id else [tag_names.RUN_ID]
    missing += [tag for tag in (tag_names.DATA_MD5, tag_names.WEIGHTS_SHA256) if not tags.get(tag)]
    if missing:
        raise LineageError(
            f"{model_uri} cannot be reproduced: its lineage is incomplete",
            [f"missing version tag: {tag}" for tag in missing]
            + ["only versions registered by `stemma run train` carry what a rebuild needs"],
        )
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LineageError(
            f"{model_uri} cannot be reproduced: its training run {run_id} is gone from the store"
        ) from None
    run_tags = run.data.tags
    spec_yaml = read_run_artifact(client, run_id, SPEC_ARTIFACT)
    if spec_yaml is None:  # an older run, or a store whose artifacts are gone
        raise LineageError(
            f"{model_uri} cannot be reproduced: run {run_id} has no {SPEC_ARTIFACT}",
            ["the resolved spec is what fixes the seeds and settings of the rebuild"],
        )
    facts = training_facts(client, run_id, run_tags)
    pointer = facts["pointer"] or "data.dvc"
    data_file = facts["data_file"] or ""
    return ReproductionPlan(
        model_uri=model_uri,
        model_name=str(entry.name),
        version=str(entry.version),
        run_id=run_id,
        spec_yaml=spec_yaml,
        data_pointer=pointer,
        data_md5=tags[tag_names.DATA_MD5],
        data_out=_out_path(pointer, data_file),
        git_rev=tags.get(tag_names.GIT_REV) or facts["git_rev"],
        git_dirty=facts["git_dirty"] == "true",
        weights_sha256=tags[tag_names.WEIGHTS_SHA256],
        checks_digest=tags.get(CHECKS_TAG) or facts["checks_digest"],
        metrics={key: float(value) for key, value in _compared(run.data.metrics).items()},
        device=run.data.params.get("resolved.device"),
        model_files=recorded_manifest(client, entry),
    )


def training_facts(client: Any, run_id: str, run_tags: dict[str, str]) -> dict[str, str | None]:
    """The data pointer and file, git state and checks digest of a training run.

    Read from the run's lineage record (its nodes' attributes), else from the tags runs
    of older Stemma versions carry (``stemma.data.pointer``, ``stemma.data.path``,
    ``stemma.git.*``, ``stemma.checks.digest``).
    """
    from stemma.components.platform.lineage import read_run_record, record_node

    record = read_run_record(client, run_id)
    data = (record_node(record, "data_version") or {}).get("attributes") or {}
    data_file = (record_node(record, "data_file") or {}).get("attributes") or {}
    run = (record_node(record, "run") or {}).get("attributes") or {}
    validation = record_node(record, "validation") or {}
    digest = str(validation.get("digest") or "").partition(":")[2] or None
    dirty = run.get("git_dirty")
    return {
        "pointer": data.get("pointer") or run_tags.get(tag_names.DATA_POINTER),
        "data_file": data_file.get("path") or run_tags.get(tag_names.DATA_PATH),
        "git_rev": run.get("git_rev") or run_tags.get(tag_names.GIT_REV),
        "git_dirty": str(dirty).lower() if dirty is not None else run_tags.get(tag_names.GIT_DIRTY),
        "checks_digest": digest or run_tags.get(CHECKS_TAG),
    }


def _compared(metrics: dict[str, float]) -> dict[str, float]:
    """The ``test/*`` metrics and :data:`COMPARED_METRICS` among a training run's
    ``metrics``, by their sectioned names (a run of an older Stemma has flat ones)."""
    test = metric_names.metric_name(metric_names.TEST, "")
    return {
        name: value
        for name, value in metric_names.sectioned_metrics(metrics).items()
        if name.startswith(test) or name in COMPARED_METRICS
    }


def recorded_manifest(client: MlflowClient, entry: Any) -> dict[str, str] | None:
    """The file manifest recorded on a model version, else on its logged model, else None."""
    from stemma.components.model.artifact import decode_manifest
    from stemma.components.runtime.loading import logged_model_id

    text = (entry.tags or {}).get(tag_names.MODEL_FILES)
    model_id = logged_model_id(entry)
    if not text and model_id:
        try:
            text = client.get_logged_model(model_id).tags.get(tag_names.MODEL_FILES)
        except Exception:  # an older server without logged models: nothing recorded
            text = None
    return decode_manifest(text)


def recorded_file_problems(manifest: dict[str, str] | None, folder: Path) -> list[str]:
    """How a registered version's downloaded files differ from its recorded manifest.

    Args:
        manifest: from :func:`recorded_manifest` (``ReproductionPlan.model_files``).
        folder: where the version's artifacts were downloaded.

    Returns:
        One line per missing, extra or changed file (recorded digest against found), or a
        line saying no manifest was recorded; empty when every file matches.
    """
    from stemma.components.model.artifact import file_differences, model_file_digests

    found = model_file_digests(folder)
    if manifest is None:
        return [
            "no file digests were recorded for this version (registered outside Stemma, or "
            f"by an older Stemma); its files: {', '.join(sorted(found)) or 'none'}"
        ]
    return file_differences(manifest, found)


def _normalized(relative: str, path: Path) -> bytes:
    """A file's bytes with what names the run, the moment or the folders the code ran from
    removed (MLmodel, the profile, the ONNX graph)."""
    import hashlib
    import json

    from stemma.components.model.onnx_graph import ONNX_FILE
    from stemma.components.monitoring.profile import PROFILE_FILE

    name = Path(relative).name
    if name == "MLmodel":
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key in VOLATILE_MLMODEL_KEYS:
            document.pop(key, None)
        flavor = (document.get("flavors") or {}).get("python_function") or {}
        flavor.pop("model_code_path", None)
        for artifact in (flavor.get("artifacts") or {}).values():
            if isinstance(artifact, dict):
                artifact.pop("uri", None)
        document.pop("model_size_bytes", None)
        return yaml.safe_dump(document, sort_keys=True).encode()
    if relative == PROFILE_FILE:
        document = json.loads(path.read_bytes())
        for key in VOLATILE_PROFILE_KEYS:
            document.pop(key, None)
        return json.dumps(document, sort_keys=True).encode()
    if name == ONNX_FILE:
        return _onnx_without_traces(path)
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest().encode()


def _onnx_without_traces(path: Path) -> bytes:
    """An ONNX graph without its nodes' metadata: the exporter's stack traces name the
    folders the network's code and torch ran from, which a rebuild elsewhere changes."""
    import onnx

    model = onnx.load_model_from_string(path.read_bytes())
    graphs = [model.graph, *model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            for attribute in node.attribute:
                graphs += [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]
    return model.SerializeToString()


def compare_model_files(recorded: Path, rebuilt: Path) -> tuple[int, list[str]]:
    """Compare every file of two model folders (the registered one and the rebuild).

    Files must match byte for byte, except for what names the run, the logged model or
    the moment (:data:`VOLATILE_MLMODEL_KEYS` in ``MLmodel``, the profile's ``created``)
    or the folders the code ran from (the stack traces of ``network.onnx``'s nodes).

    Returns:
        How many files were compared, and one line per file that differs or exists on one
        side only.
    """
    from stemma.components.model.artifact import model_file_digests

    before, after = model_file_digests(recorded), model_file_digests(rebuilt)
    problems = []
    for relative in sorted(before.keys() | after.keys()):
        if relative not in after:
            problems.append(f"{relative}: missing from the rebuilt model")
        elif relative not in before:
            problems.append(f"{relative}: not in the recorded model")
        elif before[relative] != after[relative] and _normalized(
            relative, recorded / relative
        ) != _normalized(relative, rebuilt / relative):
            problems.append(
                f"{relative}: differs (recorded {before[relative]}, rebuilt {after[relative]})"
            )
    return len(before.keys() | after.keys()), problems


def _out_path(pointer: str, data_file: str) -> str:
    """The folder a root DVC file tracks: the first part of the data file's path."""
    parent = Path(pointer).parent
    relative = Path(data_file)
    if parent != Path(".") and relative.is_relative_to(parent):
        relative = relative.relative_to(parent)
    return (parent / relative.parts[0]).as_posix() if relative.parts else parent.as_posix()


# ---------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class RestoredData:
    """Where the data version was restored from, and the DVC file written beside it."""

    source: str
    out_path: Path
    pointer_text: str
    notes: list[str] = field(default_factory=list)


def _digest(path: Path) -> str | None:
    if path.is_dir():
        return dir_md5(path)[0]
    if path.is_file():
        return file_md5(path)
    return None


def _cache_path(root: Path, md5: str) -> Path | None:
    """Where DVC keeps the object ``md5`` (the project's configured cache)."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return Path(repo.cache.local.oid_to_path(md5))
    except Exception:  # not a DVC project: look in the default place
        default = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        return default if default.exists() else None


def restore_data_version(
    root: Path, *, pointer: str, md5: str, out: str, git_rev: str | None, destination: Path
) -> RestoredData:
    """Copy the exact bytes of data version ``md5`` into ``destination/out``.

    The working tree's copy is used when it hashes to ``md5``; otherwise the files are
    taken from DVC's cache by their md5s. Either way the copy is hashed again and
    compared with ``md5`` before it is used.

    Raises:
        DataVersionError: neither place holds those bytes; the message names the recorded
            md5, what the working tree hashes to, and what the cache lacks or holds instead.
    """
    notes = []
    pointer_text = read_pointer_at(root, pointer, git_rev)
    recorded_out = pointer_out(pointer_text) if pointer_text else None
    if recorded_out is not None and recorded_out[0] == md5:
        out = (Path(pointer).parent / recorded_out[1]).as_posix()
        notes.append(f"{pointer} at git revision {git_rev} records {md5} for {out}")
    else:
        if pointer_text is not None:
            notes.append(
                f"{pointer} at git revision {git_rev} records "
                f"{recorded_out[0] if recorded_out else 'no md5'}, not {md5}: using the version tag"
            )
        pointer_text = f"outs:\n- md5: {md5}\n  path: {Path(out).name}\n  hash: md5\n"
    target = destination / out
    target.parent.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []

    here = root / out
    found = _digest(here)
    if found == md5:
        (shutil.copytree if here.is_dir() else shutil.copy2)(here, target)
        source = f"the working tree ({out})"
    else:
        problems.append(
            f"the working tree's {out} hashes to {found}"
            if found
            else f"{out} is not in the working tree"
        )
        problems += _copy_from_cache(root, md5, target)
        source = "the DVC cache"
    restored = _digest(target) if not problems[1:] else None
    if restored != md5:
        if restored is not None:
            problems.append(f"the bytes restored from the DVC cache hash to {restored}")
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        raise DataVersionError(
            f"data version {md5} ({pointer}) cannot be restored: the bytes differ",
            [
                f"recorded md5 {md5}",
                *problems,
                "restore it with `dvc fetch`/`dvc pull` at the training run's git revision, "
                "or reproduce on the machine whose DVC cache holds it",
            ],
        )
    return RestoredData(
        source=source, out_path=target, pointer_text=pointer_text or "", notes=notes
    )


def _copy_from_cache(root: Path, md5: str, target: Path) -> list[str]:
    """Copy the object ``md5`` (a folder listing or a file) out of the DVC cache."""
    import json

    listing_path = _cache_path(root, md5)
    if listing_path is None or not listing_path.is_file():
        return [f"the DVC cache has no object {md5}"]
    if not md5.endswith(".dir"):
        shutil.copy2(listing_path, target)
        return []
    try:
        listing = json.loads(listing_path.read_text(encoding="utf-8"))
    except ValueError:
        return [f"the DVC cache's listing {md5} is unreadable"]
    problems = []
    for entry in listing:
        relpath, expected = str(entry["relpath"]), str(entry["md5"])
        source = _cache_path(root, expected)
        if source is None or not source.is_file():
            problems.append(f"the DVC cache has no object {expected} ({relpath})")
            continue
        actual = file_md5(source, remembered=False)
        if actual != expected:
            problems.append(
                f"{relpath}: recorded md5 {expected}, the cached bytes hash to {actual}"
            )
            continue
        destination = target / relpath
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    if len(problems) > MAX_FILES_NAMED:
        problems = [*problems[:MAX_FILES_NAMED], f"... and {len(problems) - MAX_FILES_NAMED} more"]
    return problems


# ---------------------------------------------------------------------------------------
# Code


def code_revision_warnings(root: Path, git_rev: str | None, git_dirty: bool) -> list[str]:
    """How the code here differs from the code that trained the model (empty: it does not)."""
    warnings = []
    if git_dirty:
        warnings.append(
            "the model was trained from a working tree with uncommitted changes: "
            "the exact code it ran is not recorded"
        )
    if not git_rev:
        warnings.append("the training run recorded no git revision: the code cannot be checked")
        return warnings
    current, dirty = git_revision(root)
    if current is None:
        warnings.append(f"{root} is not a git repository: cannot compare with {git_rev}")
        return warnings
    changed: list[str] = []
    if current != git_rev:
        warnings.append(f"the project is at commit {current}, the model was trained at {git_rev}")
        changed = _git_lines(root, "diff", "--name-only", git_rev, "HEAD")
    if dirty:
        warnings.append("the working tree has uncommitted changes to tracked files")
        changed += _git_lines(root, "diff", "--name-only", "HEAD")
    if changed:
        names = sorted(set(changed))
        shown = ", ".join(names[:MAX_FILES_NAMED])
        more = f" and {len(names) - MAX_FILES_NAMED} more" if len(names) > MAX_FILES_NAMED else ""
        warnings.append(f"files that differ: {shown}{more}")
    return warnings


def current_project_code(root: Path, architecture: str) -> dict[str, Path]:
    """The files of a custom architecture's module in the project here, by their path in a
    model's ``code/`` folder; empty for a built-in or a module outside the project."""
    from stemma.components.model.artifact import project_code
    from stemma.components.spec import put_project_on_import_path

    put_project_on_import_path(root)  # as loading the spec does, so its module is found
    return project_code(architecture, root)


def network_code_warnings(root: Path, plan: ReproductionPlan) -> list[str]:
    """How the project's module of a custom architecture differs from the one the model
    carries (empty: it does not, or the model carries no code)."""
    from stemma.components.model.artifact import code_sha256
    from stemma.components.runtime.loading import sha256_file

    recorded = plan.code_files
    if not recorded:
        return []
    found = {
        relative: sha256_file(path)
        for relative, path in current_project_code(root, plan.architecture).items()
    }
    if found == recorded:
        return []
    differences = []
    for relative in sorted(recorded.keys() | found.keys()):
        before, after = recorded.get(relative), found.get(relative)
        if before == after:
            continue
        if after is None:
            differences.append(f"{relative}: missing here")
        elif before is None:
            differences.append(f"{relative}: new here")
        else:
            differences.append(f"{relative}: changed (trained with {before}, here {after})")
    shown = differences[:MAX_FILES_NAMED]
    if len(differences) > MAX_FILES_NAMED:
        shown.append(f"... and {len(differences) - MAX_FILES_NAMED} more")
    return [
        f"the module of model.architecture {plan.architecture} changed since training "
        f"(code digest {code_sha256(recorded)} recorded, {code_sha256(found) or 'none'} here); "
        "the rebuild runs the code here",
        *(f"module file {line}" for line in shown),
    ]


def _git_lines(root: Path, *args: str) -> list[str]:
    return [line for line in (run_git(root, *args) or "").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# Judging


@dataclass(frozen=True)
class TensorDifference:
    """One tensor of the state dict that is not bit-identical."""

    name: str
    problem: str
    max_abs_diff: float | None = None
    differing: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class MetricDifference:
    name: str
    recorded: float | None
    reproduced: float | None


@dataclass
class Verdict:
    """The comparison of a rebuilt model with the recorded one."""

    model_uri: str
    recorded_sha256: str
    reproduced_sha256: str
    tensors_compared: int
    tensors: list[TensorDifference] = field(default_factory=list)
    metrics_compared: int = 0
    metrics: list[MetricDifference] = field(default_factory=list)
    checks: tuple[str | None, str | None] = (None, None)
    files_compared: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return (
            self.recorded_sha256 == self.reproduced_sha256
            and not self.tensors
            and not self.metrics
            and not self.files
            and self.checks[0] == self.checks[1]
        )

    def render(self) -> list[str]:
        if self.reproduced:
            return [
                f"REPRODUCED {self.model_uri}: weights bit-identical "
                f"({self.tensors_compared} tensors, sha256 {self.reproduced_sha256}), "
                f"{self.metrics_compared} metrics equal, "
                f"{self.files_compared} model files match"
            ]
        lines = [f"NOT REPRODUCED {self.model_uri}:"]
        if self.recorded_sha256 != self.reproduced_sha256:
            lines.append(
                f"  weights sha256: recorded {self.recorded_sha256}, rebuilt {self.reproduced_sha256}"
            )
        for tensor in self.tensors:
            detail = tensor.problem
            if tensor.max_abs_diff is not None:
                detail += (
                    f": {tensor.differing} of {tensor.size} values differ, "
                    f"max abs diff {tensor.max_abs_diff:.6g}"
                )
            lines.append(f"  tensor {tensor.name}: {detail}")
        for metric in self.metrics:
            lines.append(
                f"  metric {metric.name}: recorded {metric.recorded!r}, rebuilt {metric.reproduced!r}"
                + (
                    f" (diff {metric.reproduced - metric.recorded:+.6g})"
                    if metric.recorded is not None and metric.reproduced is not None
                    else ""
                )
            )
        if self.checks[0] != self.checks[1]:
            lines.append(
                f"  validation result digest: recorded {self.checks[0]}, rebuilt {self.checks[1]}"
            )
        lines += [f"  file {problem}" for problem in self.files]
        return lines


def compare_tensors(recorded: Path, rebuilt: Path) -> tuple[int, list[TensorDifference]]:
    """Compare two safetensors files tensor by tensor, bit for bit."""
    import torch
    from safetensors.torch import load_file

    before, after = load_file(str(recorded)), load_file(str(rebuilt))
    differences = []
    for name in sorted(before.keys() | after.keys()):
        if name not in after:
            differences.append(TensorDifference(name, "missing from the rebuilt model"))
            continue
        if name not in before:
            differences.append(TensorDifference(name, "not in the recorded model"))
            continue
        a, b = before[name], after[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            differences.append(
                TensorDifference(
                    name, f"recorded {tuple(a.shape)} {a.dtype}, rebuilt {tuple(b.shape)} {b.dtype}"
                )
            )
            continue
        if a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)):
            continue
        delta = (a.double() - b.double()).abs()
        differences.append(
            TensorDifference(
                name,
                "values differ",
                max_abs_diff=float(delta.nan_to_num(nan=math.inf).max()),
                differing=int((a != b).sum()),
                size=int(a.numel()),
            )
        )
    return len(before.keys() | after.keys()), differences


def compare_metrics(
    recorded: dict[str, float], rebuilt: dict[str, float]
) -> tuple[int, list[MetricDifference]]:
    """Metrics that differ at all (NaN equals NaN); a metric on one side only differs."""
    differences = []
    for name in sorted(recorded.keys() | rebuilt.keys()):
        a, b = recorded.get(name), rebuilt.get(name)
        same = a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
        if not same:
            differences.append(MetricDifference(name, a, b))
    return len(recorded.keys() | rebuilt.keys()), differences


def judge(
    plan: ReproductionPlan,
    *,
    recorded_weights: Path,
    rebuilt_weights: Path,
    rebuilt_sha256: str,
    rebuilt_metrics: dict[str, float],
    rebuilt_checks_digest: str | None,
    recorded_folder: Path | None = None,
    rebuilt_folder: Path | None = None,
) -> Verdict:
    """Compare a rebuilt model with the recorded one: weights, metrics, validation result
    and, given both model folders, every file of the model (:func:`compare_model_files`)."""
    compared, tensors = compare_tensors(recorded_weights, rebuilt_weights)
    files_compared, files = 0, list[str]()
    if recorded_folder is not None and rebuilt_folder is not None:
        files_compared, files = compare_model_files(recorded_folder, rebuilt_folder)
    metrics_compared, metrics = compare_metrics(plan.metrics, _compared(rebuilt_metrics))
    return Verdict(
        model_uri=plan.model_uri,
        recorded_sha256=plan.weights_sha256,
        reproduced_sha256=rebuilt_sha256,
        tensors_compared=compared,
        tensors=tensors,
        metrics_compared=metrics_compared,
        metrics=metrics,
        checks=(plan.checks_digest, rebuilt_checks_digest),
        files_compared=files_compared,
        files=files,
    )
