"""Loading a spec: read the file within limits, apply ``--set`` overrides, validate it all.

Spec YAML is read within limits: plain YAML only, bounded size, depth and expansion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stemma.components.errors import SpecError
from stemma.components.spec.document import (
    LoadedSpec,
    Problem,
    Spec,
    dotted,
    line_of,
    pydantic_message,
    section_problems,
    valid_sections,
)

#: Largest spec file (and ``--set`` value) read, in bytes; a real spec is a few KiB.
MAX_SPEC_BYTES = 1024 * 1024
#: Deepest nesting of mappings and lists in a spec; real specs nest five levels at most.
MAX_SPEC_DEPTH = 32
#: Most values (scalars, mappings, lists) a spec may hold with its aliases expanded: an
#: alias may repeat a value, not multiply the spec a billion times.
MAX_SPEC_NODES = 20_000


class SpecLimitError(yaml.MarkedYAMLError):
    """The YAML is refused: too deep, too many values with aliases expanded, or a tag that
    would build something other than plain data."""


_YAML_TAG_PREFIX = "tag:yaml.org,2002:"


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with the spec's nesting and expanded-size limits enforced while
    the document is composed (before any value is built), so a hostile file costs no more
    than its limits."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        # Values under each composed node, aliases expanded, by node identity.
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        # PyYAML's C and pure-Python marks differ only in the stubs.
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._aliases += 1
            if id(node) not in self._sizes:
                raise SpecLimitError(
                    problem=f"alias *{event.anchor} refers to a value that contains it",
                    problem_mark=mark,
                )
            return node
        if self._depth >= MAX_SPEC_DEPTH:
            raise SpecLimitError(
                problem=f"nesting deeper than {MAX_SPEC_DEPTH} levels",
                problem_mark=mark,
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return node
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(item)] for item in node.value)
        else:
            size = 1
        if size > MAX_SPEC_NODES:
            how = " once aliases are expanded" if self._aliases else ""
            raise SpecLimitError(
                problem=f"more than {MAX_SPEC_NODES:,} values{how}",
                problem_mark=node.start_mark,
            )
        self._sizes[id(node)] = size
        return node


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    tag = str(node.tag)
    shown = "!!" + tag.removeprefix(_YAML_TAG_PREFIX) if tag.startswith(_YAML_TAG_PREFIX) else tag
    raise SpecLimitError(
        problem=(
            f"tag {shown} is not allowed: a spec holds plain YAML (mappings, lists, strings, "
            "numbers, booleans, null)"
        ),
        problem_mark=node.start_mark,
    )


BoundedLoader.add_constructor(None, _refuse_tag)

# Booleans as YAML 1.2 reads them: only true and false. YAML 1.1's yes, no, on and off stay
# text, so a label map `{yes: 1, no: 0}` maps the strings its data holds; a boolean field
# still takes them, as pydantic reads "yes" and "no" as booleans.
_BOOL_TAG = _YAML_TAG_PREFIX + "bool"
BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
BoundedLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse spec YAML within the spec's limits; return the value and its composed node.

    Raises:
        SpecLimitError: over :data:`MAX_SPEC_BYTES`, :data:`MAX_SPEC_DEPTH` or
            :data:`MAX_SPEC_NODES`, a recursive alias, or a tag that is not plain YAML.
        yaml.YAMLError: the text is not valid YAML.
    """
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        raise SpecLimitError(problem=f"larger than {kib(MAX_SPEC_BYTES)}, the most a spec may be")
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return value, node


def kib(size: int) -> str:
    return f"{size // 1024:,} KiB"


def apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem], dict[tuple[str, ...], str]]:
    """Apply ``key.path=value`` overrides to a raw spec mapping, without mutating it.

    Values are parsed as YAML (``3`` is an int, ``[1, 2]`` a list, ``null`` None).

    Returns:
        The new mapping, problems with malformed overrides, and for each overridden
        path the override text (so errors can name it).
    """
    result: dict[str, Any] = _deep_copy(raw)
    problems: list[Problem] = []
    origins: dict[tuple[str, ...], str] = {}
    for item in overrides:
        parsed = _parse_override(item)
        if isinstance(parsed, Problem):
            problems.append(parsed)
            continue
        path, value = parsed
        node = result
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        origins[path] = f"--set {item}"
    return result, problems, origins


def _parse_override(item: str) -> tuple[tuple[str, ...], Any] | Problem:
    """The path and the value of a ``key.path=value`` override, or why it is refused."""
    key, sep, value_text = item.partition("=")
    path = tuple(part for part in key.strip().split(".") if part)
    if not sep or not path:
        return Problem((), f"override {_shorten(item)!r} must look like `section.key=value`")
    if len(path) > MAX_SPEC_DEPTH:
        depth = f"nesting deeper than {MAX_SPEC_DEPTH} levels"
        return Problem((), f"override key {_shorten(key)!r}: {depth}")
    try:
        return path, load_yaml(value_text)[0] if value_text.strip() else None
    except SpecLimitError as error:
        return Problem(path, f"override value refused: {error.problem}")
    except yaml.YAMLError as error:
        return Problem(path, f"override value {value_text!r} is not valid YAML: {error}")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def find_project_root(config_path: Path) -> Path:
    """The project root: the nearest folder above the config holding `data.dvc`, `.dvc` or `.git`.

    Falls back to the current directory, so a spec outside any project resolves its
    paths the way a user typing them in a shell would expect.
    """
    for folder in [config_path.resolve().parent, *config_path.resolve().parents]:
        if (
            (folder / "data.dvc").exists()
            or (folder / ".dvc").is_dir()
            or (folder / ".git").exists()
        ):
            return folder
    return Path.cwd()


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    check_imports: bool = True,
    check_expectations: bool = True,
) -> LoadedSpec:
    """Read, override and validate a spec; report every problem at once.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied on top of the file.
        check_paths: also check that data paths exist.
        check_imports: also import a model given as ``module:Class``.
        check_expectations: also check expectation types and kwargs against the catalogue.

    Raises:
        SpecError: with one line per problem, each naming file, line and YAML path.
    """
    config_path = Path(path)
    file_name = config_path.name
    raw, root_node = read_spec_file(config_path)

    merged, problems, origins = apply_overrides(raw, overrides)

    def located(loc: tuple[str | int, ...], message: str) -> Problem:
        # An override explains a problem at its own path, below it (a bad value inside
        # a section it set) or above it (a key it added to a section that forbids it).
        origin = next(
            (
                text
                for key, text in origins.items()
                if tuple(loc[: len(key)]) == key or key[: len(loc)] == tuple(loc)
            ),
            None,
        )
        return Problem(loc, message, None if origin else line_of(root_node, loc), origin)

    spec: Spec | None = None
    try:
        spec = Spec.model_validate(merged)
    except ValidationError as error:
        problems += [located(tuple(item["loc"]), pydantic_message(item)) for item in error.errors()]

    root = find_project_root(config_path)
    # Cross-section checks run on every section that is valid on its own, so a typo in
    # `train` does not hide a missing data file: every problem is reported at once.
    sections = dict(spec) if spec is not None else valid_sections(merged)
    for loc, message in section_problems(
        sections,
        root,
        check_paths=check_paths,
        check_imports=check_imports,
        check_expectations=check_expectations,
    ):
        problems.append(located(loc, message))

    if problems:
        problems.sort(key=lambda p: (p.line or 0, dotted(p.loc)))
        noun = "problem" if len(problems) == 1 else "problems"
        raise SpecError(
            f"{config_path}: {len(problems)} {noun} in the spec",
            [p.render(file_name) for p in problems],
        )
    assert spec is not None
    return LoadedSpec(
        spec=spec, path=config_path, root=root, raw=merged, overrides=tuple(overrides)
    )


def read_spec_file(config_path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """The spec file's top-level mapping and its composed YAML node, read within limits.

    Raises:
        SpecError: the file is missing, unreadable, too large, not UTF-8, not valid or
            not plain YAML, or not a mapping.
    """
    try:
        # Read one byte past the limit: a huge file (or /dev/zero) is refused unread.
        with config_path.open("rb") as handle:
            content = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{config_path}: no such spec file") from None
    except OSError as error:
        raise SpecError(f"{config_path}: cannot read the spec: {error.strerror}") from None
    if len(content) > MAX_SPEC_BYTES:
        raise SpecError(
            f"{config_path}: refused: larger than {kib(MAX_SPEC_BYTES)}, the most a spec may be"
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{config_path}: refused: not UTF-8 text (byte {error.start} cannot be decoded)"
        ) from None
    file_name = config_path.name
    try:
        raw, root_node = load_yaml(text)
    except SpecLimitError as error:
        mark = error.problem_mark
        where = f"{config_path}:{mark.line + 1}" if mark is not None else str(config_path)
        raise SpecError(f"{where}: refused: {error.problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file_name}:{mark.line + 1}" if mark is not None else file_name
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(f"{config_path}: not valid YAML", [f"{where} {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(
            f"{config_path}: the spec must be a mapping of sections",
            [f"{file_name}:1 (top level): got {type(raw).__name__}"],
        )
    return raw, root_node
