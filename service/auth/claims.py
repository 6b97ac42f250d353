"""Reading grants out of a token's claims: the topics claim, and grant templates.

A claim is named by a *path*: the name taken verbatim when the token has it at the top level
(``https://example.com/topics``, ``cognito:groups``), else a dotted path into nested objects
(``app_metadata.topics``). The topics claim holds a JSON array of topics or one string of
space-separated topics. A grant template (``orders/{org_id}``) is filled from the token, each
value percent-encoded as ``realtime.topic_segment`` encodes a watched table's key, so a grant
names exactly the topics the triggers write. A template whose claim is missing, null, empty,
or not a string or number grants nothing — never the bare parent topic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Unauthorized

MISSING: Any = object()
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
# realtime.topic_segment's alphabet: what a key keeps; everything else is %XX of its UTF-8.
SEGMENT_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-")


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at ``path`` (verbatim top-level name first, else dotted), or ``MISSING``."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def topics_from(claims: Mapping[str, Any], path: str) -> list[str]:
    """The topics the token's topics claim grants (none when it is absent or null)."""
    value = claim_at(claims, path)
    if value is MISSING or value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(topic, str) for topic in value):
        return list(value)
    raise Unauthorized(f"invalid token: claim {path!r} must be an array of topics or a "
                       "string of space-separated topics", code="invalid_token")


def topic_segment(value: str) -> str:
    """``value`` as one topic segment, as ``realtime.topic_segment`` encodes a key."""
    return "".join(ch if ch in SEGMENT_SAFE else "".join(f"%{b:02X}" for b in ch.encode())
                   for ch in value)


def scalar_text(value: Any) -> str | None:
    """A claim as a key's text (as ``jsonb ->>`` renders it), or None when it grants nothing."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)  # 7.0 stays "7.0", as jsonb keeps a number's text
    return None


@dataclass(frozen=True)
class GrantTemplate:
    """``orders/{org_id}``: literal text with claim placeholders (``AUTH_GRANTS``)."""

    text: str

    @property
    def paths(self) -> list[str]:
        return PLACEHOLDER.findall(self.text)

    def fill(self, claims: Mapping[str, Any]) -> str | None:
        """The granted topic, or None when a placeholder's claim is unusable."""
        values: dict[str, str] = {}
        for path in self.paths:
            try:
                text = scalar_text(claim_at(claims, path))
            except (TypeError, ValueError, OverflowError):
                text = None
            if text is None:
                return None
            values[path] = topic_segment(text)
        return PLACEHOLDER.sub(lambda match: values[match.group(1)], self.text)
