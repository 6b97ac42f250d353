"""Failover without phantoms: positions are never reused across a change of primary.

With asynchronous replication, a promoted standby may lack the last events the old primary
numbered, and some clients already hold them. Protocol (``sql/migrations/007_timelines.sql``):

- The sequencer, each time it takes the lead, calls ``realtime.observe_timeline_v1()``
  (``observe``): on a timeline newer than the one recorded, ``last_position`` jumps by 10^9
  and the skipped range ``(skipped_from, skipped_through]`` is recorded in
  ``realtime.timelines``. New events are numbered after it, so no position the old primary
  may have handed out is ever given to a different event.
- A resume from inside a skipped range gets ``reset`` (unknown_position): ``stream.py`` asks
  ``History.skipped``.
- A reader (``feed.Listener``, ``replica.StandbyReader``) whose cursor sits at or inside a
  skipped range moves past it (``rebase``): live streams past its start get ``reset``
  (``Hub.skip``); streams at or before it lost nothing and continue.
"""

from __future__ import annotations

import logging

from . import db
from .hub import Hub
from .queries import query

log = logging.getLogger("pgsse.timelines")


async def observe(conn: db.Connection) -> int:
    """The sequencer's check on taking the lead; returns the positions skipped (0: none)."""
    skipped: int = await conn.fetchval(query("observe_timeline"))
    if skipped:
        log.warning("new timeline: positions skipped", extra={
            "event": "timeline_changed", "skipped": skipped})
    return skipped


async def rebase(conn: db.Connection, cursor: int, hub: Hub) -> int | None:
    """When ``cursor`` is at or inside a skipped range, move the hub past it and return the
    new cursor; None when there is nothing to skip yet."""
    for row in await conn.fetch(query("skipped_ranges"), cursor):
        start: int = row["skipped_from"]
        end: int = row["skipped_through"]
        if cursor < start:
            return None  # events up to ``start`` are still to be read
        if cursor > start:
            log.warning("the feed read events the new primary does not have", extra={
                "event": "feed_phantoms", "cursor": cursor, "skipped_from": start,
                "skipped_through": end})
        hub.skip(start, end)
        return end
    return None
