"""Per-client limits: open streams per token subject or address, aggregate request rate."""

from __future__ import annotations

import time

from . import metrics
from .errors import TooManyRequests

MAX_TRACKED_CLIENTS = 100_000


class Limits:
    def __init__(self, streams_per_client: int, requests_per_second: float) -> None:
        self.streams_per_client = streams_per_client
        self.rate = requests_per_second
        self.burst = max(1.0, requests_per_second * 2)
        self.open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def check_stream(self, client: str) -> None:
        if self.open.get(client, 0) >= self.streams_per_client:
            metrics.REJECTED.labels("client_connections").inc()
            raise TooManyRequests(
                f"at most {self.streams_per_client} open streams per client", retry_after=5)

    def opened(self, client: str) -> None:
        self.open[client] = self.open.get(client, 0) + 1

    def closed(self, client: str) -> None:
        left = self.open.get(client, 1) - 1
        if left > 0:
            self.open[client] = left
        else:
            self.open.pop(client, None)

    def check_rate(self, client: str) -> None:
        """Token bucket: ``rate`` per second, bursts up to twice that."""
        now = time.monotonic()
        tokens, stamp = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            metrics.REJECTED.labels("aggregate_rate").inc()
            raise TooManyRequests("too many aggregate requests", retry_after=1)
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled (forgetting them changes nothing); clearing them
        all instead would let a caller with many addresses reset everyone's limit."""
        refilled = now - self.burst / self.rate
        self._buckets = {client: bucket for client, bucket in self._buckets.items()
                         if bucket[1] > refilled}
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.clear()  # a flood of distinct active clients: memory stays bounded
