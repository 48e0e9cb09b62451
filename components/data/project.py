"""A new Stemma project in a folder: git and DVC, the training table, its spec, .gitignore.

`stemma init` checks everything before the first change (:func:`existing_project_problems`)
and :func:`create_project` undoes what it created when a step fails, so a refused or failed
init leaves the folder as it found it. git is run as an executable and DVC through its
Python API, as the rest of Stemma does.

Layout of a project:

- ``data/`` the training data, versioned by DVC as one output (``data.dvc``);
- ``production/`` batches to score and their labels as they arrive: git-ignored, and not
  training data, so a new batch never changes the training version (retraining appends
  labelled rows to the training table as a new DVC version);
- ``configs/<name>.yaml`` the spec; ``.stemma/`` and ``outputs/`` what runs write.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from stemma.components.data.tables import ROOT_DVC_FILE, file_md5
from stemma.components.errors import DataError, SpecError
from stemma.components.platform.files import write_atomically, write_file_atomically
from stemma.components.spec.sections import NAME_PATTERN

#: The training data folder, versioned by DVC as a whole.
DATA_DIR = "data"
#: Where production batches and their labels land (git-ignored, not training data).
PRODUCTION_DIRS = ("production/batches", "production/labels")
#: The folder of specs.
CONFIG_DIR = "configs"
#: What git never sees: run state and stores, outputs, production data, environments.
IGNORED = (
    ".stemma/",
    "outputs/",
    "production/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "dask-worker-space/",
    ".venv/",
    "__pycache__/",
)
#: The pipeline name when the folder's name cannot be one.
FALLBACK_NAME = "pipeline"


@dataclass(frozen=True)
class ProjectReport:
    """What :func:`create_project` did.

    Attributes:
        root: the project folder.
        git_created: a git repository was initialised (else one was there).
        dvc_created: a DVC repository was initialised (else one was there).
        data_path: the table in the project (relative), or None without a table.
        copied_from: where the table was copied from, when it was outside ``data/``.
        data_md5: the version ``data.dvc`` records, or None without a table.
        config: the spec written (relative), or None without a table.
    """

    root: Path
    git_created: bool
    dvc_created: bool
    data_path: str | None
    copied_from: Path | None
    data_md5: str | None
    config: str | None


def default_name(root: Path) -> str:
    """The folder's name as a pipeline name (characters a name may not hold become ``-``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.resolve().name).strip("-._")
    return name if name and NAME_PATTERN.match(name) else FALLBACK_NAME


def check_name(name: str) -> None:
    """Raises SpecError when ``name`` cannot name a pipeline (and its spec file)."""
    if not NAME_PATTERN.match(name) or len(name) > 128:
        raise SpecError(
            f"--name {name!r} cannot name a pipeline",
            ["a name starts with a letter or digit, then letters, digits, `_`, `.` or `-`"],
        )


def data_placement(root: Path, source: Path) -> str:
    """Where the table lives in the project: where it is when already under ``data/``,
    else ``data/<file name>``; relative to the root, with forward slashes."""
    data = (root / DATA_DIR).resolve()
    resolved = source.resolve()
    inside = resolved.relative_to(data) if resolved.is_relative_to(data) else Path(source.name)
    return (Path(DATA_DIR) / inside).as_posix()


def existing_project_problems(root: Path, name: str, source: Path | None) -> list[str]:
    """Why ``stemma init`` may not create a project here (none: it may).

    A spec under ``configs/``, a ``.dvc`` file at the root or under ``data/`` (the data is
    versioned already), a file in the way of the copied table, or, without a table, a DVC
    repository that exists already.
    """
    root = root.resolve()
    problems = []
    config = root / CONFIG_DIR / f"{name}.yaml"
    if config.exists():
        problems.append(f"{config.relative_to(root)} exists")
    specs = sorted((root / CONFIG_DIR).glob("*.y*ml")) if (root / CONFIG_DIR).is_dir() else []
    problems += [f"{spec.relative_to(root)}: a spec exists" for spec in specs if spec != config]
    pointers = [p for p in (*root.glob("*.dvc"), *(root / DATA_DIR).rglob("*.dvc")) if p.is_file()]
    problems += [f"{p.relative_to(root)}: the data is versioned already" for p in sorted(pointers)]
    if source is None and (root / ".dvc").is_dir():
        problems.append(".dvc: a DVC repository exists (give a table to add it and its spec)")
    if source is not None:
        target = root / data_placement(root, source)
        if target.exists() and target.resolve() != source.resolve():
            same = target.is_file() and file_md5(target, remembered=False) == file_md5(
                source, remembered=False
            )
            if not same:
                problems.append(f"{target.relative_to(root)} exists and differs from {source}")
    if shutil.which("git") is None:
        problems.append("git is not installed: install it, then run stemma init again")
    return problems


def refuse_existing(root: Path, name: str, source: Path | None) -> None:
    """Raises SpecError listing :func:`existing_project_problems`, when there are any."""
    problems = existing_project_problems(root, name, source)
    if problems:
        raise SpecError(
            f"{root}: refusing to overwrite an existing project; nothing was changed",
            [*problems, "fix: run stemma init in a new folder, or remove what is listed"],
        )


def create_project(
    root: Path, *, name: str, source: Path | None = None, spec_text: str | None = None
) -> ProjectReport:
    """Make ``root`` a Stemma project: git and DVC repositories, ``.gitignore``, the folders
    of the layout, and with a table, the table under ``data/`` versioned by DVC and the spec.

    Nothing is committed in git. On failure, what was created is removed again and
    ``.gitignore`` gets its old text back.

    Args:
        root: the project folder (created when missing).
        name: the pipeline's name (``configs/<name>.yaml``).
        source: the training table, copied under ``data/`` unless it is there already.
        spec_text: the spec to write (with a table).

    Raises:
        SpecError: the folder holds a project already (nothing is changed).
        DataError: git or DVC failed (what was created is removed).
    """
    root = Path(root).resolve()
    refuse_existing(root, name, source)
    with _undone_on_failure(root) as created:
        root.mkdir(parents=True, exist_ok=True)
        git_created = _init_git(root, created)
        dvc_created = _init_dvc(root, created)
        _ignore(root)
        for folder in (DATA_DIR, *PRODUCTION_DIRS, CONFIG_DIR):
            _make_folder(root / folder, created)
        if source is None:
            return ProjectReport(root, git_created, dvc_created, None, None, None, None)
        data_path = data_placement(root, source)
        target = root / data_path
        copied = target.resolve() != source.resolve()
        if copied and not target.exists():
            _make_folder(target.parent, created)
            created.append(target)
            write_file_atomically(target, lambda path: shutil.copyfile(source, path))
        created.append(root / ROOT_DVC_FILE)
        md5 = _dvc_add(root)
        config = root / CONFIG_DIR / f"{name}.yaml"
        created.append(config)
        write_atomically(config, spec_text or "")
    return ProjectReport(
        root=root,
        git_created=git_created,
        dvc_created=dvc_created,
        data_path=data_path,
        copied_from=source.resolve() if copied else None,
        data_md5=md5,
        config=config.relative_to(root).as_posix(),
    )


@contextmanager
def _undone_on_failure(root: Path) -> Iterator[list[Path]]:
    """Yield a list to which each step adds what it creates; on failure remove them, last
    first, and give ``.gitignore`` its old text back."""
    ignore = root / ".gitignore"
    before = ignore.read_bytes() if ignore.is_file() else None
    created: list[Path] = []
    if not root.exists():
        created.append(root)
    try:
        yield created
    except BaseException:
        for path in reversed(created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if before is None:
            ignore.unlink(missing_ok=True)
        elif ignore.parent.exists():
            ignore.write_bytes(before)
        raise


def _make_folder(folder: Path, created: list[Path]) -> None:
    missing = [folder, *folder.parents]
    first_missing = next((p for p in reversed(missing) if not p.exists()), None)
    if first_missing is not None:
        created.append(first_missing)
        folder.mkdir(parents=True)


def git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``git args`` run in ``root``, its output captured as text."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _init_git(root: Path, created: list[Path]) -> bool:
    """``git init`` unless ``root`` is inside a work tree already; True when it ran."""
    if git(root, "rev-parse", "--is-inside-work-tree").returncode == 0:
        return False
    created.append(root / ".git")
    result = git(root, "init", "-q")
    if result.returncode != 0:
        raise DataError(f"{root}: git init failed", result.stderr.strip().splitlines()[:5])
    return True


def _init_dvc(root: Path, created: list[Path]) -> bool:
    """A DVC repository at ``root`` (in a subfolder of a git work tree: DVC's ``subdir``
    mode); True when it was created."""
    if (root / ".dvc").is_dir():
        return False
    from dvc.repo import Repo

    top = git(root, "rev-parse", "--show-toplevel").stdout.strip()
    created += [path for path in (root / ".dvc", root / ".dvcignore") if not path.exists()]
    Repo.init(str(root), subdir=bool(top) and Path(top).resolve() != root)
    return True


def _ignore(root: Path) -> None:
    """Add the lines of :data:`IGNORED` that ``.gitignore`` lacks, keeping its own."""
    ignore = root / ".gitignore"
    text = ignore.read_text(encoding="utf-8") if ignore.is_file() else ""
    present = {line.strip() for line in text.splitlines()}
    missing = [line for line in IGNORED if line not in present]
    if missing:
        joined = text if not text or text.endswith("\n") else text + "\n"
        header = "# Stemma: run state and stores, outputs, production data, environments\n"
        write_atomically(ignore, joined + header + "\n".join(missing) + "\n")


def _dvc_add(root: Path) -> str:
    """``dvc add data``: the training data's first version; returns its md5."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(root / DATA_DIR))
    pointer = yaml.safe_load((root / ROOT_DVC_FILE).read_text(encoding="utf-8"))
    return str(pointer["outs"][0]["md5"])
