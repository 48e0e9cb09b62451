"""Every ``stemma.*`` tag string is spelled once, in components/platform/tags.py."""

import io
import tokenize
from pathlib import Path

from stemma.components.platform import tags

ROOT = Path(__file__).resolve().parents[3]
#: Module paths are not tags.
MODULE_PREFIXES = ("stemma.components.", "stemma.flows.")


def _stemma_literals(path: Path) -> list[str]:
    """``file:line: literal`` for each plain (not f-) string literal starting ``stemma.``."""
    found = []
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.STRING:
            continue
        prefix = token.string[: len(token.string) - len(token.string.lstrip("rRbBuUfF"))]
        if "f" in prefix.lower():
            continue
        body = token.string[len(prefix) :].lstrip("\"'")
        if body.startswith("stemma.") and not body.startswith(MODULE_PREFIXES):
            line = token.start[0]
            found.append(f"{path.relative_to(ROOT)}:{line}: {token.string}")
    return found


def test_no_tag_literals_outside_tags_module():
    own = Path(tags.__file__).resolve()
    found = [
        literal
        for folder in ("components", "flows")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.resolve() != own
        for literal in _stemma_literals(path)
    ]
    assert not found, "use stemma.components.platform.tags instead of:\n" + "\n".join(found)


def test_each_tag_string_is_named_once():
    values = [
        value for name, value in vars(tags).items() if name.isupper() and isinstance(value, str)
    ]
    assert all(value.startswith("stemma.") for value in values)
    assert len(values) == len(set(values))
    # the documented lists of what each run and version kind carries name only those (or a
    # field under one of the prefixes: PROMOTION_PREFIX + "action")
    prefixes = tuple(
        value
        for name, value in vars(tags).items()
        if name.endswith("_PREFIX") and value.count(".") > 1  # a family, not all of "stemma."
    )
    listed = [*tags.COMMON_RUN_TAGS, *(tag for kind in tags.RUN_TAGS.values() for tag in kind)]
    listed += [tag for kind in tags.VERSION_TAGS.values() for tag in kind]
    unnamed = [tag for tag in listed if tag not in values and not tag.startswith(prefixes)]
    assert not unnamed, unnamed


def test_weights_hash_spellings():
    assert tags.WEIGHTS_SHA256 == "stemma.weights.sha256"
    assert tags.LOGGED_MODEL_WEIGHTS_SHA256 == "stemma.weights_sha256"
