"""Chaos scenario: schema changes on a watched table under a writer (issue #19, contract
section 14). Same rules as ``chaos_scenarios``: public contract only, fresh service and
database, every loop bounded in count and time.

A keyed, column-limited watch (``key_column => 'shop'``, ``columns => w, n, shop``) takes
ADD COLUMN ssn, RENAME of an unlisted column to ``pw``, a retype, a rename of the key
column, a rename of the table, and a TRUNCATE, while a writer commits rows for shop 1.
Judged: every committed row reaches every ``chaos_sc/1`` client exactly once, in order
(the key rename must not re-route); the TRUNCATE reaches every keyed and bare client; and no
captured change ever carries an unlisted column's value (read from ``realtime.changes``,
which is exactly what streams ship).
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg

from .chaos_infra import (
    RESULTS,
    Service,
    last_position,
    publish_end,
    service_on_fresh_db,
    wait_clients,
    wait_until,
)
from .chaos_scenarios import (
    Baseline,
    Result,
    Run,
    finish,
    live_clients,
    loss_failures,
    run_clients,
    tally_clients,
)

TOPIC = "chaos_sc"
STEPS = [
    "ALTER TABLE {t} ADD COLUMN ssn text DEFAULT '078-05-1120'",
    "ALTER TABLE {t} RENAME COLUMN secret TO pw",
    "ALTER TABLE {t} ALTER COLUMN n TYPE bigint",
    "ALTER TABLE {t} RENAME COLUMN shop TO store",
    "ALTER TABLE {t} RENAME TO chaos_sc2",
    "TRUNCATE {t}",
]


async def schema_changes(run: Run) -> Result:
    n_keyed, n_bare = (10, 2) if run.quick else (20, 5)
    per_step = 100 if run.quick else 400
    result = Result("schema_changes", f"{n_keyed} keyed + {n_bare} bare clients; ADD/RENAME/"
                    "retype columns, rename key + table, TRUNCATE under a writer")
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        # The service's role is not a superuser: a superuser adds the event triggers.
        try:
            await conn.execute("SELECT realtime.track_schema_changes()")
        except asyncpg.UndefinedFunctionError:  # a service from before migration 005 (--ref)
            result.figures["event_triggers"] = "absent"
        await conn.execute("CREATE TABLE public.chaos_sc (id serial PRIMARY KEY, w int, n int, "
                           "shop int, secret text)")
        await conn.execute(f"SELECT realtime.watch('public.chaos_sc', '{TOPIC}', 'shop', "
                           "ARRAY['w', 'n', 'shop'])")
        keyed = await live_clients(service, conn, f"{TOPIC}/1", n_keyed)
        bare = await live_clients(service, conn, TOPIC, n_bare)
        clients = keyed + bare
        tasks = await run_clients(clients, 120)
        await wait_clients(service, len(clients))
        table = {"name": "chaos_sc"}
        committed: list[int] = []
        writer = await run.pg.admin(service.database)
        stop = asyncio.Event()

        async def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    # By position: the columns are renamed under it.
                    await writer.execute(f"INSERT INTO {table['name']} "
                                         "VALUES (DEFAULT, 0, $1, 1, 's3cr3t')", n)
                    committed.append(n)
                except asyncpg.UndefinedTableError:
                    await asyncio.sleep(0.005)  # renamed meanwhile: not committed, retried

        started = time.monotonic()
        writing = asyncio.create_task(write())
        try:
            for step in STEPS:
                floor = len(committed) + per_step
                deadline = time.monotonic() + 30
                while len(committed) < floor and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                result.mark(step.split("{t} ", 1)[-1][:24])
                await conn.execute(step.format(t=table["name"]))
                if "RENAME TO" in step:
                    table["name"] = "chaos_sc2"
            floor = len(committed) + per_step
            deadline = time.monotonic() + 30
            while len(committed) < floor and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await writing
            await writer.close()
        result.figures["rows_committed"] = len(committed)
        result.figures["write_seconds"] = round(time.monotonic() - started, 1)
        await publish_end(conn, f"{TOPIC}/1", keyed)
        await publish_end(conn, TOPIC, bare)
        await finish(tasks, 45)
        rows = await conn.fetch(
            "SELECT e.position, c.op, coalesce((c.data->>'w')::int, 0) AS w, "
            "(c.data->>'n')::int AS n, c.topic FROM realtime.events e JOIN realtime.changes c "
            "ON c.xid = e.xid AND c.id = e.id WHERE c.tbl LIKE 'public.chaos_sc%' "
            "ORDER BY e.position")
        # The old name's unwatch marker (for aggregates) is owed to no stream: never shipped.
        markers = [r["position"] for r in rows if r["op"] == "unwatch"]
        rows = [r for r in rows if r["op"] != "unwatch"]
        truncates = [r["position"] for r in rows if r["op"] == "truncate"]
        keyed_truth = [(r["position"], (r["w"], r["n"] if r["n"] is not None else -1))
                       for r in rows if r["topic"] == f"{TOPIC}/1" or r["op"] == "truncate"]
        tally_clients(result, keyed, keyed_truth)
        bare_truth = [(r["position"], (r["w"], r["n"] if r["n"] is not None else -1)) for r in rows]
        tally_clients(result, bare, bare_truth)
        result.dropped = sum(1 for c in clients if c.drops)
        owed = {"keyed": {p for p, _ in keyed_truth}, "bare": {p for p, _ in bare_truth}}
        missing = []
        for kind, group in (("keyed", keyed), ("bare", bare)):
            for client in group:
                got = {item[1] for item in client.items if item[0] == "e"}
                after = int(client.start_id or 0)
                missing += [(kind, p) for p in sorted(owed[kind] - got) if p > after][:3]
        if missing:  # which positions, and what they were, to tell a loss from a bad truth
            ops = {r["position"]: (r["op"], r["topic"]) for r in rows}
            result.figures["missing_examples"] = [(k, p, *ops.get(p, ("?", "?")))
                                                  for k, p in missing[:10]]
        result.figures["clients_finished"] = sum(1 for c in clients if c.done)
        result.figures["truncate_received"] = sum(
            1 for c in clients for item in c.items if item[0] == "e" and item[1] in truncates)
        result.figures["unwatch_markers"] = len(markers)
        result.figures["markers_streamed"] = sum(
            1 for c in clients for item in c.items if item[0] == "e" and item[1] in markers)
        result.figures["rows_on_bare_topic"] = sum(1 for r in rows if r["topic"] == TOPIC
                                                   and r["op"] != "truncate")
        result.figures["leaked_changes"] = await conn.fetchval(
            "SELECT count(*) FROM realtime.changes WHERE tbl LIKE 'public.chaos_sc%' AND "
            "(coalesce(data::text, '') || coalesce(old::text, '')) ~ '078-05|s3cr3t|\"pw\"|\"ssn\"'")
        await base.deltas(result)
    failures = loss_failures(result, clients, resets_ok=False)
    if result.figures["markers_streamed"]:
        failures.append(f"{result.figures['markers_streamed']} internal markers streamed")
    if result.figures["leaked_changes"]:
        failures.append(f"{result.figures['leaked_changes']} changes carried unlisted columns")
    if result.figures["rows_on_bare_topic"]:
        failures.append(f"{result.figures['rows_on_bare_topic']} rows re-routed to the bare topic")
    if len(truncates) != 1 or result.figures["truncate_received"] != len(clients):
        failures.append(f"TRUNCATE reached {result.figures['truncate_received']} of {len(clients)} clients")
    return result.judge(failures)


# --- unwatch with a cached aggregate ------------------------------------------------------

TOTAL_SQL = """-- Sum of a table that gets unwatched.
-- cache: public, max-age=5
SELECT sum(v) AS total FROM public.chaos_agg
"""


async def unwatch_cached_aggregate(run: Run) -> Result:
    """An aggregate answered from memory (304s, cached 200s) while its table is unwatched,
    written to, watched again: after each commit, once the service has read past it, every
    answer must show the committed sum (no stale 304, no stale cached 200); after watching
    again, 304s must be free again (no query)."""
    n_rounds = 20 if run.quick else 50
    result = Result("unwatch_cached_aggregate", f"cached aggregate; unwatch, {n_rounds} commits "
                    "each checked by 304 and 200, watch again")
    directory = RESULTS / "tmp" / "unwatch_aggregates"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.sql"):
        stale.unlink()
    env = {"AGGREGATES_DIR": str(directory)}
    async with service_on_fresh_db(run.pg, result.scenario, env) as (service, conn):
        await conn.execute("CREATE TABLE public.chaos_agg (id serial PRIMARY KEY, v int)")
        await conn.execute("GRANT SELECT ON public.chaos_agg TO pgsse_reader")
        await conn.execute("SELECT realtime.watch('public.chaos_agg')")
        await conn.execute("INSERT INTO chaos_agg (v) VALUES (50)")
        (directory / "chaos_total.sql").write_text(TOTAL_SQL)
        service.stop()  # the aggregate's table exists now: start again with the file
        service.start()
        await service.wait_ready()
        base = Baseline(service)
        path = "/aggregates/chaos_total"

        async def caught_up() -> None:
            target = await last_position(conn)
            await wait_until(lambda: _at(service, target), 20, 0.01)

        async def total_now() -> int:
            value: int = await conn.fetchval("SELECT sum(v) FROM chaos_agg")
            return value

        async def queries() -> float:
            return await service.metric(
                'pgsse_aggregate_query_duration_seconds_count{aggregate="chaos_total"}')

        await caught_up()
        first = await service.get(path)
        etag = first.headers.get("etag", "")
        free_before = [(await service.get(path, {"If-None-Match": etag})).status for _ in range(20)]
        result.mark("unwatch")
        await conn.execute("SELECT realtime.unwatch('public.chaos_agg')")
        stale_304 = stale_200 = checked = 0
        for i in range(n_rounds):
            await conn.execute("INSERT INTO chaos_agg (v) VALUES ($1)", 1000 if i == 0 else 1)
            await caught_up()  # the unwatch marker at least; rows have no event any more
            want = await total_now()
            conditional = await service.get(path, {"If-None-Match": etag})
            if conditional.status == 304:
                stale_304 += 1
            plain = await service.get(path)
            if json.loads(plain.body)["data"] != [{"total": want}]:
                stale_200 += 1
            checked += 1
        await conn.execute("SELECT realtime.watch('public.chaos_agg')")
        await conn.execute("INSERT INTO chaos_agg (v) VALUES (2)")
        await caught_up()
        again = await service.get(path)
        ran = await queries()
        free_after = [(await service.get(path, {"If-None-Match": again.headers.get("etag", "")})).status
                      for _ in range(20)]
        result.figures.update(
            answers_checked=checked, stale_304=stale_304, stale_200=stale_200,
            free_304_before=free_before.count(304), free_304_after_rewatch=free_after.count(304),
            queries_for_304s_after_rewatch=await queries() - ran,
            fresh_after_rewatch=json.loads(again.body)["data"] == [{"total": await total_now()}])
        await base.deltas(result)
    result.no_stream()
    failures = []
    if stale_304 or stale_200:
        failures.append(f"{stale_304} stale 304s and {stale_200} stale 200s of {checked} checks")
    if result.figures["free_304_before"] != 20 or result.figures["free_304_after_rewatch"] != 20:
        failures.append("304s were not free before the unwatch or after watching again")
    if result.figures["queries_for_304s_after_rewatch"]:
        failures.append("304s after watching again ran queries")
    if not result.figures["fresh_after_rewatch"]:
        failures.append("stale answer after watching again")
    return result.judge(failures)


async def _at(service: Service, target: int) -> bool:
    try:
        return int((await service.stats())["position"]) >= target
    except (OSError, TimeoutError, ValueError, KeyError):
        return False
