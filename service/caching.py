"""HTTP caching for aggregates: entity tags, the result cache, and single flight.

- ``if_none_match`` is RFC 9110's weak comparison against a header value: ``*`` or a
  comma-separated list of (possibly weak) quoted tags. A malformed header matches nothing,
  so the worst a client's garbage gets is a 200.
- ``ResultCache`` keeps response bodies by key, least recently used first out, bounded by
  the bytes of the bodies (and their gzip forms, made once on first demand). An entry is
  only ever used when its ETag equals the ETag computed *now*, so it cannot be stale.
- ``SingleFlight`` runs one coroutine per key at a time, in a task of its own: concurrent
  misses await the same result, and a caller that goes away cancels nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from . import metrics

T = TypeVar("T")
_TAG = re.compile(r'\s*(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')
GZIP_MIN = 512


def entity_tags(header: str) -> list[str] | None:
    """The opaque tags (quotes included) of an ``If-None-Match`` list; ``None`` if malformed."""
    tags: list[str] = []
    position, end = 0, len(header)
    while position < end:
        if header[position] in " \t,":
            position += 1  # empty list elements are allowed
            continue
        match = _TAG.match(header, position)
        if match is None:
            return None
        tags.append(match.group(1))
        position = match.end()
    return tags


def if_none_match(header: str, etag: str) -> bool:
    """Whether ``header`` matches ``etag`` by weak comparison (``*`` matches any)."""
    if header.strip() == "*":
        return True
    tags = entity_tags(header)
    opaque = etag[2:] if etag.startswith("W/") else etag
    return tags is not None and opaque in tags


def weak_etag(*parts: bytes | str) -> str:
    """``W/"<32 hex>"``: a digest of ``parts``, stable across processes."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x00")
    return 'W/"' + digest.hexdigest()[:32] + '"'


def accepts_gzip(header: str) -> bool:
    """``Accept-Encoding`` lists gzip (or ``*``) with a non-zero quality."""
    for item in header.lower().split(","):
        coding, _, params = item.partition(";")
        if coding.strip() in ("gzip", "x-gzip", "*"):
            quality = params.strip()
            if quality.startswith("q="):
                try:
                    return float(quality[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


ENTRY_OVERHEAD = 500  # the entry, its ordered-dict slot, the key tuple: rounded up


class Entry:
    __slots__ = ("etag", "body", "gzipped", "key_bytes")

    def __init__(self, etag: str, body: bytes) -> None:
        self.etag = etag
        self.body = body
        self.gzipped: bytes | None = None
        self.key_bytes = 0

    @property
    def size(self) -> int:
        """What the cache really holds for this entry: bodies, key and overhead."""
        return len(self.body) + len(self.gzipped or b"") + self.key_bytes + ENTRY_OVERHEAD


class ResultCache:
    """LRU of ``Entry`` by key, bounded by ``limit`` bytes: bodies, keys (which hold the
    parameter values) and a per-entry overhead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable, etag: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None or entry.etag != etag:
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Entry) -> None:
        self.discard(key)
        entry.key_bytes = len(repr(key))
        if entry.size * 4 > self.limit:
            return  # one huge result must not flush everything else
        self.entries[key] = entry
        self.bytes += entry.size
        self._trim()

    def gzipped(self, key: Hashable, entry: Entry) -> bytes:
        """The entry's body gzipped, compressed once and kept while the entry is."""
        if entry.gzipped is None:
            entry.gzipped = gzip.compress(entry.body, compresslevel=5, mtime=0)
            if self.entries.get(key) is entry:
                self.bytes += len(entry.gzipped)
                self._trim()
        return entry.gzipped

    def discard(self, key: Hashable) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def _trim(self) -> None:
        while self.bytes > self.limit and self.entries:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.size
        metrics.AGGREGATE_CACHE_BYTES.set(self.bytes)


class SingleFlight(Generic[T]):
    """At most one running ``make()`` per key; everyone asking meanwhile shares its result."""

    def __init__(self) -> None:
        self.flights: dict[Hashable, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self.flights)

    async def run(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        task = self.flights.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self.flights[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        # shield: a caller that disconnects stops waiting, the query goes on for the others.
        return await asyncio.shield(task)

    def _landed(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self.flights.get(key) is task:
            del self.flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter re-raises it itself


def cache_control(value: str, auth: bool) -> str:
    """The file's ``cache:`` header; with auth on, ``private`` (a shared cache must not keep it)."""
    if not auth:
        return value
    parts = [p.strip() for p in value.split(",") if p.strip()]
    kept = [p for p in parts if p.lower() not in ("public", "private")
            and not p.lower().startswith("s-maxage")]
    return ", ".join(["private", *kept])
