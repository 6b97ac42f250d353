"""Topics: ``/``-separated segments; a subscription covers its topic and everything below.

``orders`` covers ``orders/42`` and ``orders/42/lines``; ``orders/4`` does not cover
``orders/42`` because matching is segment by segment. The hub indexes subscriptions by
topic and looks an event up under each of its topic's prefixes.
"""

from __future__ import annotations

import re

MAX_TOPIC_LENGTH = 256
TOPIC_RE = re.compile(r"[A-Za-z0-9_.:@%-]+(?:/[A-Za-z0-9_.:@%-]+)*")


def is_valid(topic: str) -> bool:
    return len(topic) <= MAX_TOPIC_LENGTH and TOPIC_RE.fullmatch(topic) is not None


def prefixes(topic: str) -> list[str]:
    """``a/b/c`` → ``["a", "a/b", "a/b/c"]``: every subscription topic that covers it."""
    out = []
    index = topic.find("/")
    while index != -1:
        out.append(topic[:index])
        index = topic.find("/", index + 1)
    out.append(topic)
    return out


def covers(grant: str, topic: str) -> bool:
    """Whether a subscription or grant for ``grant`` includes ``topic``."""
    return grant == "*" or topic == grant or topic.startswith(grant + "/")


# Mercure updates travel as events of this topic (``pgsse.mercure``); they carry their own
# topics and privacy, so ``/events`` never serves it (a private update would leak).
MERCURE_TOPIC = "_mercure"


def is_reserved(topic: str) -> bool:
    return topic == MERCURE_TOPIC or topic.startswith(MERCURE_TOPIC + "/")
