"""Resolving a REF of ``stemma lineage`` and ``stemma reproduce`` to a lineage node id."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from stemma.components.errors import LineageError
from stemma.components.lineage.index import RUN_PREFIX, RecordIndex
from stemma.components.platform import tags as tag_names
from stemma.components.platform.lineage import ASSET_KEY_PREFIX, data_node_id, model_node_id
from stemma.components.platform.refs import ModelRef, ModelRefError, parse_model_ref
from stemma.components.platform.tracking import run_git

#: The scoring engine's manifest, written last into a prediction folder.
MANIFEST_NAME = "_SUCCESS"

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
_POINTER = re.compile(r"^(?P<pointer>[^@\s]+\.dvc)(?:@(?P<rev>\S+))?$")
_NODE_ID = re.compile(r"^[a-z][a-z0-9_-]*:\S+$")

#: The forms of REF, as error messages list them.
ACCEPTED_FORMS = (
    "models:/<name>@<alias>      a registered model's alias, e.g. models:/credit@champion",
    "models:/<name>/<version>    a model version, e.g. models:/credit/7",
    "<run id>                    an MLflow run that recorded lineage",
    "<md5>                       a data version by its DVC md5 (`<md5>.dir` for a folder)",
    "data.dvc@<git rev>          the data version a DVC file recorded at a git revision",
    "<folder>|_SUCCESS|<part>    a scoring output: its folder, its manifest or a part file",
    "<kind>:<id>                 any node id `stemma lineage` prints, e.g. mlflow-run:<id>",
)


def model_reference(text: str) -> ModelRef | None:
    """``text`` as a ``models:/`` reference, or None when it is not one."""
    try:
        return parse_model_ref(text)
    except ModelRefError:
        return None


def resolve_reference(reference: str, index: RecordIndex, root: Path) -> str:
    """The node id a REF names (see :data:`ACCEPTED_FORMS`).

    Args:
        reference: what the user typed.
        index: the record index on the store.
        root: the project root (for paths, DVC files and git revisions).

    Raises:
        LineageError: the reference has none of the accepted forms, or names nothing
            the store recorded; the message says which and lists the forms.
    """
    text = reference.strip()
    if text.startswith(ASSET_KEY_PREFIX):
        text = text[len(ASSET_KEY_PREFIX) :]
    model = model_reference(text)
    if model is not None and model.alias is not None:
        return _resolve_alias(model.name, model.alias, index)
    if model is not None and model.version is not None:
        return _resolve_version(model.name, model.version, index)
    if text.startswith(RUN_PREFIX):
        return _resolve_run(text[len(RUN_PREFIX) :], index, as_md5=False)
    if _MD5.match(text.lower()):
        return _resolve_run(text.lower(), index, as_md5=True)
    if match := _POINTER.match(text):
        return _resolve_pointer(match["pointer"], match["rev"], index, root)
    path = Path(text) if Path(text).is_absolute() else root / text
    if path.exists():
        if (
            (path.is_dir() and (path / MANIFEST_NAME).is_file())
            or path.name == MANIFEST_NAME
            or (path.is_file() and (path.parent / MANIFEST_NAME).is_file())
        ):
            return _resolve_predictions(path, index, root)
        return _resolve_data_path(path, index, root)
    if _NODE_ID.match(text) and (index.runs_that_made(text) or index.runs_that_used(text, limit=1)):
        return text
    raise LineageError(
        f"{reference!r} names nothing Stemma can trace",
        [
            "no model, run, data version, scoring output or recorded node matches it",
            "REF takes one of these forms:",
            *(f"  {form}" for form in ACCEPTED_FORMS),
        ],
    )


def _resolve_alias(name: str, alias: str, index: RecordIndex) -> str:
    from mlflow.exceptions import MlflowException

    index.calls += 1
    try:
        version = index.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise LineageError(
            f"models:/{name}@{alias}: no such model alias", _registry_listing(name, index)
        ) from None
    return _resolve_version(name, str(version.version), index)


def _resolve_version(name: str, version: str, index: RecordIndex) -> str:
    entry = index.model_version(name, version)
    if entry is None:
        raise LineageError(
            f"models:/{name}/{version}: no such model version", _registry_listing(name, index)
        )
    node = model_node_id(name, version)
    tags = dict(entry.tags or {})
    # Stemma's versions name their run: older ones in a tag, newer ones by their run_id,
    # with Stemma's weights hash beside it
    named = tags.get(tag_names.RUN_ID) or (entry.run_id and tags.get(tag_names.WEIGHTS_SHA256))
    if not named and not index.runs_that_made(node):
        raise LineageError(
            f"models:/{name}/{version} carries no lineage",
            [
                f"the version has no {tag_names.WEIGHTS_SHA256} tag and no run recorded making "
                "it: it was registered outside Stemma's flows",
                f"its source: {entry.source}",
            ],
        )
    return node


def _registry_listing(name: str, index: RecordIndex) -> list[str]:
    from mlflow.exceptions import MlflowException

    index.calls += 1
    try:
        registered = index.client.get_registered_model(name)
    except MlflowException:
        return [f"there is no registered model named {name!r} in {index.client.tracking_uri}"]
    aliases = ", ".join(
        f"{alias} -> v{version}" for alias, version in sorted((registered.aliases or {}).items())
    )
    index.calls += 1
    versions = sorted(
        int(v.version) for v in index.client.search_model_versions(f"name = '{name}'")
    )
    return [
        f"its aliases: {aliases or 'none'}",
        f"its versions: {', '.join(map(str, versions)) or 'none'}",
    ]


def _resolve_run(text: str, index: RecordIndex, *, as_md5: bool) -> str:
    if not as_md5 or _HEX32.match(text):
        record = index.record(text)
        if record is not None:
            return record.run_node
    if as_md5:
        node = _find_data_version(text, index)
        if node is not None:
            return node
    raise LineageError(
        f"{text!r}: no MLflow run with this id"
        + (" and no data version with this md5" if as_md5 else ""),
        [
            f"looked in {index.client.tracking_uri}",
            "check MLFLOW_TRACKING_URI (or run from the project root), or copy the id from "
            "`stemma lineage models:/<name>@champion`",
        ],
    )


def _find_data_version(md5: str, index: RecordIndex) -> str | None:
    """The node id of a data version (or data file) recorded with ``md5``."""
    digest = f"md5:{md5}"
    for tag in (tag_names.DATA_MD5, tag_names.DATA_FILE_MD5):
        for record in index.search(f"tags.`{tag}` = '{md5}'", limit=1):
            candidates = [
                node
                for node in record.nodes.values()
                if node.get("digest") == digest and node.get("kind") != "run"
            ]
            candidates.sort(key=lambda node: node.get("kind") != "data_version")
            if candidates:
                return str(candidates[0]["id"])
    node = data_node_id("data.dvc", md5)
    if index.runs_that_used(node, limit=1) or index.runs_that_made(node):
        return node
    return None


def read_pointer_at(root: Path, pointer: str, rev: str | None) -> str | None:
    """The DVC file's text at a git revision (the working tree's when ``rev`` is None), or
    None when it cannot be read there."""
    if rev:
        return run_git(root, "show", f"{rev}:{pointer}")
    try:
        return (root / pointer).read_text(encoding="utf-8")
    except OSError:
        return None


def read_pointer(root: Path, pointer: str, rev: str | None) -> tuple[str, str]:
    """The md5 and out path a DVC file records, in the working tree or at a git revision.

    Raises:
        LineageError: the file does not exist there or records no md5.
    """
    text = read_pointer_at(root, pointer, rev)
    where = f"{pointer} at git revision {rev}" if rev else pointer
    if text is None and rev:
        raise LineageError(
            f"{where}: cannot read it",
            [
                f"`git show {rev}:{pointer}` failed in {root}: check the revision and that "
                "the project is a git repository",
            ],
        )
    if text is None:
        raise LineageError(f"{root / pointer}: no such DVC file")
    out = pointer_out(text)
    if out is None:
        raise LineageError(f"{where}: records no data version (no outs[0].md5)")
    return out


def pointer_out(text: str) -> tuple[str, str] | None:
    """The md5 and path of a DVC file's first out, or None when it records none."""
    try:
        out = yaml.safe_load(text)["outs"][0]
        return str(out["md5"]), str(out["path"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


def _resolve_pointer(pointer: str, rev: str | None, index: RecordIndex, root: Path) -> str:
    md5, _ = read_pointer(root, pointer, rev)
    node = data_node_id(pointer, md5)
    if index.runs_that_used(node, limit=1) or index.runs_that_made(node):
        return node
    found = _find_data_version(md5, index)
    if found is not None:
        return found
    raise LineageError(
        f"{pointer}{'@' + rev if rev else ''} records data version {md5}, which no run recorded",
        ["nothing was trained or scored on this data version in " + index.client.tracking_uri],
    )


def _resolve_predictions(path: Path, index: RecordIndex, root: Path) -> str:
    folder = path if path.is_dir() else path.parent
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise LineageError(
            f"{path}: not a complete scoring output",
            [f"its folder has no {MANIFEST_NAME} manifest: the scoring run did not finish"],
        )
    manifest_bytes = manifest_path.read_bytes()
    sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if path.suffix == ".parquet":
        _check_part(path, manifest_bytes)
    try:
        relative = folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        relative = str(folder.resolve())
    node = f"predictions:{relative}@{sha256}"
    if index.runs_that_made(node):
        return node
    for record in index.search(f"tags.`{tag_names.OUTPUT_SHA256}` = '{sha256}'", limit=1):
        for candidate in record.nodes.values():
            if candidate.get("digest") == f"sha256:{sha256}":
                return str(candidate["id"])
    raise LineageError(
        f"{folder}: no scoring run recorded this output",
        [
            f"its manifest has sha256 {sha256}",
            f"looked in {index.client.tracking_uri}; the folder may come from another store "
            "or have been rewritten after the run",
        ],
    )


def _resolve_data_path(path: Path, index: RecordIndex, root: Path) -> str:
    """A data folder or file DVC tracks: its data version, or the file in it."""
    from stemma.components.data.tables import resolve_data_version
    from stemma.components.errors import DataError

    try:
        version = resolve_data_version(root, path)
    except DataError as error:
        raise LineageError(
            f"{path}: neither a scoring output nor data DVC can vouch for",
            [error.headline, *error.details],
        ) from None
    pointer = version.dvc_file.relative_to(root.resolve()).as_posix()
    if version.file_path == version.out_path:
        node = data_node_id(pointer, version.md5)
    else:
        node = f"file:{version.relpath}@{version.file_md5}"
    if index.runs_that_used(node, limit=1) or index.runs_that_made(node):
        return node
    raise LineageError(
        f"{path}: no run recorded reading these bytes",
        [f"they are {node}", f"looked in {index.client.tracking_uri}"],
    )


def _check_part(path: Path, manifest_bytes: bytes) -> None:
    try:
        manifest = json.loads(manifest_bytes)
        parts = {str(p["name"]): str(p["sha256"]) for p in manifest.get("parts", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    expected = parts.get(path.name)
    if expected is None:
        raise LineageError(
            f"{path}: the manifest beside it does not list this part",
            ["the file was not written by the scoring run that wrote the manifest"],
        )
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise LineageError(
            f"{path}: changed since it was written",
            [f"the manifest records sha256 {expected}", f"the file hashes to  {actual}"],
        )
