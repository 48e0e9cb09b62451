"""``models:/`` references: the one parser, the one formatter and the one alias rule.

Stemma names a registered model version as ``models:/<name>/<version>`` or
``models:/<name>@<alias>``. Names and aliases follow the rules MLflow enforces when it
creates them (``mlflow.utils.validation``), so a reference Stemma accepts can exist.
"""

from __future__ import annotations

import posixpath
import re
from typing import NamedTuple

from stemma.components.errors import StemmaError

SCHEME = "models:/"
#: MLflow's alias rule: letters, digits, underscores and dashes (``[\w-]``), at most 255.
ALIAS_PATTERN = re.compile(r"[\w-]+")
MAX_ALIAS_LENGTH = 255
#: Aliases MLflow reserves: ``latest`` (any case) and version-like ``v<digits>``.
RESERVED_ALIAS = "latest"
_VERSION_LIKE_ALIAS = re.compile(r"[vV][0-9]+")
_VERSION = re.compile(r"[0-9]+")
#: How a reference is written, for error messages.
FORMS = "models:/<name>/<version> (models:/credit/7) or models:/<name>@<alias>"


class ModelRefError(StemmaError, ValueError):
    """Text that is not a ``models:/`` reference, or an alias MLflow would refuse."""


class ModelRef(NamedTuple):
    """A parsed reference: ``version`` (digits, as MLflow's API takes it) or ``alias``."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return format_model_ref(self.name, version=self.version, alias=self.alias)


def alias_problem(alias: str) -> str | None:
    """Why MLflow would refuse ``alias`` as an alias name, or None when it is valid."""
    if not ALIAS_PATTERN.fullmatch(alias):
        return f"alias {alias!r} may hold only letters, digits, '_' and '-'"
    if len(alias) > MAX_ALIAS_LENGTH:
        return f"alias is longer than {MAX_ALIAS_LENGTH} characters"
    if alias.lower() == RESERVED_ALIAS or _VERSION_LIKE_ALIAS.fullmatch(alias):
        return f"alias {alias!r} is reserved by MLflow"
    return None


def is_valid_alias(alias: str) -> bool:
    """True when MLflow accepts ``alias`` as a registered model alias."""
    return alias_problem(alias) is None


def check_alias(alias: str) -> str:
    """``alias`` itself, or :class:`ModelRefError` saying why MLflow would refuse it."""
    problem = alias_problem(alias)
    if problem is not None:
        raise ModelRefError(f"{alias!r} is not a valid model alias", [problem])
    return alias


def name_problem(name: str) -> str | None:
    """Why MLflow would refuse ``name`` as a registered model name, or None."""
    if not name.strip():
        return "the model name is empty"
    if "/" in name or ":" in name:
        return f"model name {name!r} may not hold '/' or ':'"
    normal = posixpath.normpath(name)
    if normal != name or normal == "." or normal.startswith(".."):
        return f"model name {name!r} is not a plain name"
    return None


def parse_model_ref(text: str) -> ModelRef:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (surrounding blanks ignored).

    Raises:
        ModelRefError: the text has neither shape, or its name or alias MLflow would refuse.
    """
    stripped = text.strip()
    rest = stripped.removeprefix(SCHEME)
    name, version, alias = rest, None, None
    if "/" in rest:
        name, _, version = rest.partition("/")
    elif "@" in rest:
        name, _, alias = rest.rpartition("@")
    problem = None
    if rest == stripped:
        problem = f"it does not start with {SCHEME}"
    elif version is None and alias is None:
        problem = "it names neither a version nor an alias"
    elif version is not None and not _VERSION.fullmatch(version):
        problem = f"the version {version!r} is not a number"
    else:
        problem = name_problem(name) or (alias_problem(alias) if alias is not None else None)
    if problem is not None:
        raise ModelRefError(f"{text!r} is not a model reference", [problem, f"write {FORMS}"])
    return ModelRef(name, version, alias)


def format_model_ref(
    name: str, *, version: str | int | None = None, alias: str | None = None
) -> str:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>``: exactly one of the two."""
    if (version is None) == (alias is None):
        raise ValueError("a model reference names exactly one of a version and an alias")
    return f"{SCHEME}{name}/{version}" if version is not None else f"{SCHEME}{name}@{alias}"


def logged_model_id(uri: str) -> str | None:
    """The logged model id in a ``models:/m-...`` URI, or None for any other URI."""
    rest = uri.removeprefix(SCHEME)
    if rest != uri and rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return rest
    return None
