"""Prometheus metrics, all prefixed ``pgsse_``, in base units.

Declared once per process. Labels never carry ids or raw paths: routes are templates,
aggregates are the names of loaded files.

With ``WORKERS=N`` (N > 1) each worker keeps its own registry (no multiprocess mode: its
mmap-backed values would cost every increment on the fan-out path, and a restarted worker's
gauges would linger) and labels every series ``worker="<index>"``; ``/metrics`` on the
worker a scrape reaches asks its siblings for theirs over Unix sockets (``workers.py``) and
answers for the whole group, adding ``pgsse_worker_up{worker}`` (0 for a sibling that did
not answer within ``SIBLING_TIMEOUT``). Sum over ``worker`` for the process group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONNECTED_CLIENTS = Gauge(
    "pgsse_connected_clients", "Event streams currently open.", registry=REGISTRY
)
EVENTS_READ = Counter(
    "pgsse_events_read", "Events read from the PostgreSQL event log.", registry=REGISTRY
)
EVENTS_DELIVERED = Counter(
    "pgsse_events_delivered", "Events written to client streams (one per client per event).",
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "pgsse_delivery_latency_seconds",
    "Time from the change being written in PostgreSQL to its bytes being written to a client "
    "(sampled: one write in 16).",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
FANOUT_DURATION = Histogram(
    "pgsse_fanout_duration_seconds", "Time to hand one batch of events to every subscriber.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    registry=REGISTRY,
)
FEED_UP = Gauge(
    "pgsse_feed_up", "1 while the change-feed (LISTEN) connection is open.", registry=REGISTRY
)
FEED_RECONNECTS = Counter(
    "pgsse_feed_reconnects", "Change-feed reconnections after a lost connection.",
    registry=REGISTRY,
)
FEED_LAG_POSITIONS = Gauge(
    "pgsse_feed_lag_positions", "Positions sequenced in PostgreSQL but not yet fanned out here.",
    registry=REGISTRY,
)
FEED_LAG_SECONDS = Gauge(
    "pgsse_feed_lag_seconds", "Age of the newest event fanned out when it was read.",
    registry=REGISTRY,
)
SEQUENCER_LEADER = Gauge(
    "pgsse_sequencer_leader", "1 while this process holds the sequencer lock.", registry=REGISTRY
)
EVENTS_SEQUENCED = Counter(
    "pgsse_events_sequenced", "Events given a position by this process's sequencer.",
    registry=REGISTRY,
)
FEED_GAPS = Counter(
    "pgsse_feed_gaps", "Times history was pruned before this process read it (live clients "
    "were sent a reset).", registry=REGISTRY,
)
SLOW_CLIENTS_DROPPED = Counter(
    "pgsse_slow_clients_dropped", "Streams closed because they stayed behind too long.",
    registry=REGISTRY,
)
CATCHUPS = Counter(
    "pgsse_stream_catchups", "Times a live stream fell behind (its socket was full) and caught "
    "up from the shared log instead of being dropped.", registry=REGISTRY,
)
REPLAYS = Counter(
    "pgsse_replays", "Stream resumptions by how they were served.", ["source"], registry=REGISTRY
)
STREAMS_ENDED = Counter(
    "pgsse_streams_ended", "Streams ended by the server, by reason.", ["reason"], registry=REGISTRY
)
REJECTED = Counter(
    "pgsse_rejected_requests", "Requests refused by a limit, by limit.", ["limit"],
    registry=REGISTRY,
)
NOTIFY_QUEUE_USAGE = Gauge(
    "pgsse_notify_queue_usage_ratio", "pg_notification_queue_usage() of the database.",
    registry=REGISTRY,
)
HISTORY_ROWS = Gauge(
    "pgsse_history_rows", "Events retained in realtime.events (estimate).", registry=REGISTRY
)
HISTORY_AGE = Gauge(
    "pgsse_history_oldest_age_seconds", "Age of the oldest retained event.", registry=REGISTRY
)
HISTORY_PRUNED = Counter(
    "pgsse_history_pruned_events", "Events pruned past HISTORY_RETENTION.", registry=REGISTRY
)
AGGREGATE_REQUESTS = Counter(
    "pgsse_aggregate_requests", "Aggregate requests by outcome (200, 304, 4xx, or a 503's error code).",
    ["aggregate", "outcome"], registry=REGISTRY,
)
AGGREGATE_QUERY_DURATION = Histogram(
    "pgsse_aggregate_query_duration_seconds", "Time spent running aggregate queries.",
    ["aggregate"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
AGGREGATE_CACHE_BYTES = Gauge(
    "pgsse_aggregate_cache_bytes", "Bytes held by the aggregate result cache.", registry=REGISTRY
)
EXPORTS = Counter(
    "pgsse_export_streams", "Exports ended, by outcome (complete, failed, disconnected, rejected).",
    ["aggregate", "outcome"], registry=REGISTRY,
)
EXPORT_ROWS = Counter(
    "pgsse_export_rows", "Rows written by exports.", ["aggregate"], registry=REGISTRY
)
EXPORT_BYTES = Counter(
    "pgsse_export_bytes", "Bytes of rows written by exports, before compression.",
    ["aggregate"], registry=REGISTRY,
)
EXPORTS_ACTIVE = Gauge(
    "pgsse_export_active", "Exports running now (each holds a database connection).",
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "pgsse_http_requests", "HTTP requests by route template, method and status.",
    ["route", "method", "status"], registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "pgsse_http_request_duration_seconds",
    "Time to the response start, by route template (streams: time to headers).",
    ["route"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)


# issue 19: a sequencer that cannot number, its reconnects, and pruning that falls behind.
SEQUENCER_CAN_NUMBER = Gauge(
    "pgsse_sequencer_can_number", "1 while this process's sequencer could number events (it "
    "leads and numbers, or it follows on a writable session); 0 while it fails (read-only "
    "database or role, missing privileges, lost connection).", registry=REGISTRY,
)
SEQUENCER_RECONNECTS = Counter(
    "pgsse_sequencer_reconnects", "Sequencer connections given up after a failure (each "
    "followed by a backoff and a new connection).", registry=REGISTRY,
)
HISTORY_RETENTION = Gauge(
    "pgsse_history_retention_seconds", "HISTORY_RETENTION, for alerts on history kept too long.",
    registry=REGISTRY,
)
HISTORY_PRUNE_TIMEOUTS = Counter(
    "pgsse_history_prune_timeouts", "Pruning steps cancelled by a statement timeout (the next "
    "steps are smaller; the sequencer keeps its connection).", registry=REGISTRY,
)


_sampled = 0


def observe_delivery(count: int, first_at: float) -> None:
    """Count ``count`` events written to one client; sample one latency in 16 writes
    (observing all of them would cost more than the write itself at 10k clients)."""
    global _sampled
    EVENTS_DELIVERED.inc(count)
    _sampled += 1
    if first_at and not _sampled & 15:
        DELIVERY_LATENCY.observe(time.time() - first_at)


def render() -> tuple[bytes, str]:
    """This process's exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


SIBLING_TIMEOUT = 2.0
_worker: str | None = None                 # this worker's label, with WORKERS > 1
_siblings: Mapping[str, Path] = {}         # the other workers' label → metrics socket
_supervisor: Path | None = None            # the supervisor's counters, exposition text


def join_group(worker: str, siblings: Mapping[str, Path], supervisor: Path | None = None) -> None:
    """Label this process's series ``worker=<worker>``; ``exposition`` includes ``siblings``
    (and the supervisor's own counters, read from the file ``supervisor``)."""
    global _worker, _siblings, _supervisor
    _worker, _siblings, _supervisor = worker, dict(siblings), supervisor


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _text(families: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def _labelled(worker: str) -> Iterator[Metric]:
    for family in REGISTRY.collect():
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [s._replace(labels={**s.labels, "worker": worker}) for s in family.samples]
        yield copy


def own_exposition() -> bytes:
    """This worker's series, labelled (what a sibling fetches)."""
    assert _worker is not None
    return _text(_labelled(_worker))


async def _fetch(path: Path) -> bytes | None:
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                return await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None  # restarting, or too busy to answer: pgsse_worker_up says so


async def exposition() -> tuple[bytes, str]:
    """What ``/metrics`` answers: this process's series, or with WORKERS > 1 the group's."""
    if _worker is None:
        return render()
    merged: dict[str, Metric] = {}

    def add(families: Iterable[Metric]) -> None:
        for family in families:
            known = merged.get(family.name)
            if known is None:
                merged[family.name] = family
            else:
                known.samples.extend(family.samples)

    up = GaugeMetricFamily("pgsse_worker_up", "1 for each worker whose series this scrape "
                           "holds (WORKERS > 1), 0 for one that did not answer.",
                           labels=["worker"])
    up.add_metric([_worker], 1)
    add(_labelled(_worker))
    names = list(_siblings)
    texts = await asyncio.gather(*(_fetch(_siblings[name]) for name in names))
    for name, text in zip(names, texts, strict=True):
        up.add_metric([name], 0 if text is None else 1)
        if text is not None:
            add(text_string_to_metric_families(text.decode()))
    add([up])
    if _supervisor is not None:
        try:
            add(text_string_to_metric_families(await asyncio.to_thread(_supervisor.read_text)))
        except (OSError, ValueError):
            pass  # not written yet, or the group is stopping
    return _text(merged.values()), CONTENT_TYPE_LATEST
