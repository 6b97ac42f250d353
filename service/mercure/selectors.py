"""Mercure topic selectors: which update topics a subscription (or a token) matches.

Both dialects in use:

- 0.x (draft-dunglas-mercure-07), ``?topic=``: ``*`` matches everything; a selector holding
  ``{…}`` is an RFC 6570 URI template and matches every topic some expansion of it yields;
  anything else matches the identical topic.
- 1.0 (draft-08): ``?match=`` is exact (``*`` still everything); ``?match_urlpattern=`` is a
  WHATWG URL Pattern (PyPI ``urlpattern``, the standard's Rust implementation).

No PyPI URI-template package *matches* (they expand), so the template is turned into a
regular expression here, per operator: ``{var}`` one unreserved run, ``{+var}``/``{#var}``
anything reserved too, ``{/var}`` ``{.var}`` ``{;var}`` ``{?var}`` ``{&var}`` their prefixed
forms, each repeatable for lists and explode.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from urlpattern import URLPattern

_EXPRESSION = re.compile(r"\{([+#./;?&]?)([A-Za-z0-9_.%,*:]+)\}")
_VARNAME = re.compile(r"(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*"
                      r"(?::[1-9][0-9]{0,3}|\*)?")
_UNRESERVED = r"(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})"
_ANY = r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})"
_OPERATORS = {
    "": rf"{_UNRESERVED}*(?:,{_UNRESERVED}*)*",
    "+": rf"{_ANY}*",
    "#": rf"(?:#{_ANY}*)?",
    ".": rf"(?:\.{_UNRESERVED}*)*",
    "/": rf"(?:/{_UNRESERVED}*)*",
    ";": rf"(?:;{_UNRESERVED}+(?:={_UNRESERVED}*)?)*",
    "?": rf"(?:\?{_UNRESERVED}+={_UNRESERVED}*(?:&{_UNRESERVED}+={_UNRESERVED}*)*)?",
    "&": rf"(?:&{_UNRESERVED}+={_UNRESERVED}*)*",
}


class SelectorError(ValueError):
    """A selector that cannot be parsed (a 400 for a subscriber, refused in a token)."""


@functools.lru_cache(maxsize=4096)
def template_regex(template: str) -> re.Pattern[str]:
    """The RFC 6570 template as an anchored regular expression over expansions."""
    out: list[str] = []
    last = 0
    for match in _EXPRESSION.finditer(template):
        literal = template[last:match.start()]
        if "{" in literal or "}" in literal:
            raise SelectorError(f"malformed URI template {template!r}")
        out.append(re.escape(literal))
        operator, names = match.groups()
        if not all(_VARNAME.fullmatch(name) for name in names.split(",")):
            raise SelectorError(f"malformed URI template expression {match.group(0)!r}")
        out.append(_OPERATORS[operator])
        last = match.end()
    tail = template[last:]
    if "{" in tail or "}" in tail:
        raise SelectorError(f"malformed URI template {template!r}")
    out.append(re.escape(tail))
    return re.compile("".join(out))


@functools.lru_cache(maxsize=4096)
def _urlpattern(pattern: str) -> URLPattern:
    try:
        return URLPattern(pattern)
    except (ValueError, TypeError) as exc:
        raise SelectorError(f"invalid URL pattern {pattern!r}: {exc}") from exc


@dataclass(frozen=True)
class Selector:
    kind: str  # "any" | "exact" | "template" | "urlpattern"
    text: str

    def matches(self, topic: str) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "exact":
            return topic == self.text
        if self.kind == "template":
            return template_regex(self.text).fullmatch(topic) is not None
        try:
            return bool(_urlpattern(self.text).test(topic))
        except (ValueError, TypeError):
            return False  # a topic that is no URL never matches a URL pattern


def legacy(text: str) -> Selector:
    """A 0.x selector (``?topic=``, ``mercure.subscribe``/``publish`` claims)."""
    if text == "*":
        return Selector("any", text)
    if "{" in text or "}" in text:
        template_regex(text)  # malformed → SelectorError
        return Selector("template", text)
    return Selector("exact", text)


def exact(text: str) -> Selector:
    return Selector("any" if text == "*" else "exact", text)


def urlpattern(text: str) -> Selector:
    _urlpattern(text)  # invalid → SelectorError
    return Selector("urlpattern", text)


def any_matches(selectors: Sequence[Selector], topics: Iterable[str]) -> bool:
    return any(s.matches(t) for t in topics for s in selectors)
