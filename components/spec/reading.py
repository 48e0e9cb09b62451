"""Reading spec YAML within limits: plain YAML only, bounded size, depth and expansion."""

from __future__ import annotations

from typing import Any

import yaml

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
