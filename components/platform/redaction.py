"""Credentials out of everything Stemma prints, logs, tags or exports.

Stores are often named by URLs that carry a secret in their user part
(``http://user:password@mlflow.internal``, ``postgresql://app:pw@db/mlflow``,
``https://TOKEN@git.example.com``). Stemma needs the real URL to connect, but a copy of it
must never reach a terminal, a log, an MLflow tag or param, a lineage record or an
OpenLineage event. :func:`redact_url` masks the user part of every URL in a text:
``user:password@`` becomes ``user:***@`` (the user name helps whoever reads it; the
password does not), and a user part without a password, which is usually a token,
becomes ``***@``. :func:`redact` does the same through nested dicts and lists. Stemma's own
asset keys (``stemma://dvc:data.dvc@<md5>``) name lineage nodes, never a server with
credentials: they are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

#: What replaces a password or a token.
MASK = "***"
#: The scheme of Stemma's asset keys, whose ``kind:id@digest`` is no user part.
ASSET_SCHEME = "stemma://"

# A scheme, then the user part up to the last "@" before the host. The user part stops at
# whitespace, quotes, brackets and the characters that end an authority ("/", "?", "#"),
# so a URL inside JSON or prose never swallows the text after it.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#\"'<>()\[\]{}\\]*)@"
)

T = TypeVar("T")


def _mask(match: re.Match[str]) -> str:
    if match.group("scheme").lower() == ASSET_SCHEME:
        return match.group(0)
    user, colon, _ = match.group("userinfo").partition(":")
    masked = f"{user}:{MASK}" if colon else MASK
    return f"{match.group('scheme')}{masked}@"


def redact_url(text: str) -> str:
    """``text`` with the user part of every URL in it masked.

    >>> redact_url("open http://stemma:s3cret@127.0.0.1:5000 in a browser")
    'open http://stemma:***@127.0.0.1:5000 in a browser'
    >>> redact_url("https://ghp_token@github.com/org/repo.git")
    'https://***@github.com/org/repo.git'
    """
    if "@" not in text:  # most texts: no regular expression at all
        return text
    return _USERINFO.sub(_mask, text)


def without_credentials(url: str) -> str:
    """``url`` without its user part, for links shown or stored (a browser asks for the
    credentials) and for requests that need none (urllib would take them for the host).

    >>> without_credentials("http://stemma:s3cret@127.0.0.1:5000/health")
    'http://127.0.0.1:5000/health'
    """
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact(value: T) -> T:
    """A copy of ``value`` (strings, and dicts, lists and tuples of them, nested) with every
    URL's user part masked, keys included; other values are returned as they are."""
    if isinstance(value, str):
        return redact_url(value)  # type: ignore[return-value]
    if isinstance(value, Mapping):
        return {redact(key): redact(item) for key, item in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [redact(item) for item in value]  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(redact(item) for item in value)  # type: ignore[return-value]
    return value


def contains_credentials(text: str) -> bool:
    """Whether ``text`` holds a URL whose user part :func:`redact_url` would mask."""
    return redact_url(text) != text
