"""Chaos scenarios 5–11: hostile HTTP load, readiness, claims, header timeout, CR/LF table
names, sequencing bursts, and the regression guards (backend kill storm, refused logins,
PostgreSQL restart, connection churn). Same rules as ``chaos_scenarios``: public contract
only, fresh service and database per scenario, every loop bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import asyncpg

from .chaos_infra import (
    DATA,
    Service,
    SseClient,
    inbox_empty,
    last_position,
    publish_end,
    service_on_fresh_db,
    truth_of,
    wait_clients,
    wait_sequenced,
    wait_until,
)
from .chaos_scenarios import (
    MB,
    Baseline,
    Result,
    Run,
    finish,
    live_clients,
    loss_failures,
    run_clients,
    tally_clients,
)


async def head_status(port: int, path: str, headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> tuple[int, float]:
    """Status of one request on a fresh connection, from the response head only (so an
    event stream answers too); 0 when the connection fails or times out. And the seconds."""
    t0 = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
                         "Connection: close\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            return int(head[9:12]), time.monotonic() - t0
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return 0, time.monotonic() - t0
    finally:
        if writer is not None:
            writer.transport.abort()


# --- 5. unique-parameter flood ----------------------------------------------------------

ECHO_SQL = """-- Length of a text parameter (chaos suite: the unique-parameter flood).
-- param q: text
-- cache: public, max-age=60
SELECT length(:q) AS len
"""


async def param_flood(run: Run) -> Result:
    total, value_len, concurrency = 20_000, 7000, 8
    result = Result("param_flood", f"{total:,} GET /aggregates/chaos_echo?q=<unique "
                    f"{value_len // 1000} KB value>, {concurrency} keep-alive connections").no_stream()
    agg_dir = DATA / "aggregates"
    agg_dir.mkdir(parents=True, exist_ok=True)
    (agg_dir / "chaos_echo.sql").write_text(ECHO_SQL)
    statuses: dict[int, int] = {}
    errors = [0]
    async with service_on_fresh_db(run.pg, result.scenario,
                                   {"AGGREGATES_DIR": str(agg_dir)}) as (service, _conn):
        warm, _ = await head_status(service.port, "/aggregates/chaos_echo?q=warm")
        base = Baseline(service)
        counter = iter(range(total))
        t0 = time.monotonic()
        await asyncio.gather(*(_flood_worker(service.port, counter, value_len, statuses, errors)
                               for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
        rss_after = service.rss()
        cache = (await service.stats()).get("cache")
        result.rss_delta_mb = round((rss_after - base.rss) / MB, 1)
        result.fd_delta = service.fds() - base.fds
        result.figures.update(warmup_status=warm, statuses=statuses, connection_errors=errors[0],
                              requests_per_s=round(sum(statuses.values()) / elapsed),
                              stats_cache=cache)
    failures = []
    if warm != 200:
        failures.append(f"the aggregate answered {warm} before the flood")
    done = sum(statuses.values())
    if done < total:
        failures.append(f"only {done} of {total} requests answered")
    bad = {k: v for k, v in statuses.items() if k not in (200, 400)}
    if bad:
        failures.append(f"statuses other than 200/400: {bad}")
    if result.rss_delta_mb is not None and result.rss_delta_mb >= 30:
        failures.append(f"RSS grew {result.rss_delta_mb} MB (limit 30)")
    return result.judge(failures)


async def _flood_worker(port: int, counter: Any, value_len: int, statuses: dict[int, int],
                        errors: list[int]) -> None:
    reader = writer = None
    for i in counter:
        value = f"{i:08d}" + "y" * (value_len - 8)
        request = (f"GET /aggregates/chaos_echo?q={value} HTTP/1.1\r\n"
                   "Host: 127.0.0.1\r\n\r\n").encode()
        for _attempt in range(3):
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                async with asyncio.timeout(10):
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    low = head.lower()
                    if b"transfer-encoding: chunked" in low:
                        while True:
                            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                            await reader.readexactly(size + 2)
                            if size == 0:
                                break
                    else:
                        at = low.find(b"content-length:")
                        length = int(low[at + 15:low.find(b"\r\n", at)]) if at >= 0 else 0
                        await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                if b"connection: close" in low:
                    writer.transport.abort()
                    writer = None
                break
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                errors[0] += 1
                if writer is not None:
                    writer.transport.abort()
                writer = None
    if writer is not None:
        writer.transport.abort()


# --- 6. readiness -----------------------------------------------------------------------


async def readiness(run: Run) -> Result:
    seconds = 20 if run.quick else 60
    result = Result("readiness", f"100 events/s for {seconds} s, /readyz every 100 ms; then "
                    f"{'PostgreSQL stopped' if run.pg.embedded else 'logins refused'} and restored")
    topic = "chaos_ready"
    probes: dict[int, int] = {}
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        clients = await live_clients(service, conn, topic, 5)
        tasks = await run_clients(clients, seconds + 60)
        await wait_clients(service, 5)
        stop = time.monotonic() + seconds
        writer = asyncio.create_task(_paced_writer(conn, topic, 100, stop))
        while time.monotonic() < stop:
            status, _ = await head_status(service.port, "/readyz", timeout=2)
            probes[status] = probes.get(status, 0) + 1
            await asyncio.sleep(0.1)
        published = await writer
        await publish_end(conn, topic, clients)
        await finish(tasks, 30)
        truth = await truth_of(conn, topic)
        tally_clients(result, clients, truth)
        await conn.close()
        # The outage, then the recovery, each timed from the moment it is in place.
        t0 = time.monotonic()
        result.mark("database down")
        if run.pg.embedded:
            await run.pg.stop_server()
        else:
            await run.pg.refuse_logins(True)
        outage_at = time.monotonic()
        to_503 = await _until_status(service, 503, 15)
        result.mark("database back")
        if run.pg.embedded:
            await run.pg.start_server()
        else:
            await run.pg.refuse_logins(False, terminate=None)
        to_200 = await _until_status(service, 200, 30)
        result.figures.update(probes=probes, published=published, outage_setup_s=round(
            outage_at - t0, 1), to_503_s=to_503, to_200_s=to_200)
        await base.deltas(result)
    failures = loss_failures(result, clients, resets_ok=False)
    non200 = sum(v for k, v in probes.items() if k != 200)
    if non200:
        failures.append(f"{non200} of {sum(probes.values())} /readyz probes not 200 with no fault")
    if to_503 is None or to_503 > 5:
        failures.append(f"503 after {to_503} s of outage (limit 5)")
    if to_200 is None or to_200 > 5:
        failures.append(f"200 after {to_200} s of recovery (limit 5)")
    return result.judge(failures)


async def _until_status(service: Service, want: int, limit: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        status, _ = await head_status(service.port, "/readyz", timeout=1)
        if status == want:
            return round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.1)
    return None


async def _paced_writer(conn: asyncpg.Connection, topic: str, rate: float, stop: float,
                        w: int = 0) -> int:
    """One event per transaction at ``rate``/s until ``stop``; returns how many committed."""
    n = 0
    t0 = time.monotonic()
    while time.monotonic() < stop:
        n += 1
        await conn.execute("SELECT realtime.publish($1, 'chaos.x', jsonb_build_object('w', $2::int, "
                           "'n', $3::int))", topic, w, n)
        delay = t0 + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    return n


# --- 7. claims --------------------------------------------------------------------------

SECRET = "chaos-suite-secret-0123456789abcdef"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(claims_json: str) -> str:
    """An HS256 JWT over exactly this claims text (so it can hold what json.dumps won't)."""
    head = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(claims_json.encode())
    sig = hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(sig)


async def claims(run: Run) -> Result:
    now = int(time.time())
    big = "9" * 400
    grant = '"topics":["*"]'
    cases = {
        "valid (control)": f'{{"exp":{now + 600},{grant}}}',
        "exp numeric string": f'{{"exp":"{now + 600}",{grant}}}',
        "exp 400 digits": f'{{"exp":{big},{grant}}}',
        "exp 1e400": f'{{"exp":1e400,{grant}}}',
        "exp true": f'{{"exp":true,{grant}}}',
        "exp null": f'{{"exp":null,{grant}}}',
        "exp object": f'{{"exp":{{"n":1}},{grant}}}',
        "nbf string": f'{{"exp":{now + 600},"nbf":"{now - 60}",{grant}}}',
        "nbf 400 digits": f'{{"exp":{now + 600},"nbf":{big},{grant}}}',
        "iat string": f'{{"exp":{now + 600},"iat":"{now}",{grant}}}',
        "iat 400 digits": f'{{"exp":{now + 600},"iat":{big},{grant}}}',
        "iat -400 digits": f'{{"exp":{now + 600},"iat":-{big},{grant}}}',
    }
    paths = ("/events?topic=chaos", "/aggregates/event_types", "/stats")
    result = Result("claims", f"{len(cases) - 1} malformed-claim tokens + 1 valid, on "
                    f"{len(paths)} endpoints").no_stream()
    answers: dict[str, dict[str, int]] = {}
    async with service_on_fresh_db(run.pg, result.scenario, {"AUTH_SECRET": SECRET}) as (
            service, _conn):
        base = Baseline(service)
        for name, text in cases.items():
            token = sign(text)
            answers[name] = {}
            for path in paths:
                status, _ = await head_status(service.port, path,
                                              {"Authorization": f"Bearer {token}"})
                answers[name][path] = status
        await base.deltas(result)
    result.figures["answers"] = answers
    failures = []
    for name, by_path in answers.items():
        want = 200 if name.startswith("valid") else 401
        wrong = {p: s for p, s in by_path.items() if s != want}
        if wrong:
            failures.append(f"{name}: {wrong} (want {want})")
    return result.judge(failures)


# --- 8. header timeout ------------------------------------------------------------------


async def header_timeout(run: Run) -> Result:
    count, limit = 2000, 15.0
    result = Result("header_timeout", f"{count:,} connections sending one header line every "
                    "10 s; GET /healthz meanwhile").no_stream()
    async with service_on_fresh_db(run.pg, result.scenario) as (service, _conn):
        base = Baseline(service)
        conns: list[list[float]] = []  # [opened at, closed by the server at (or 0)]
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        for start in range(0, count, 250):  # the listen backlog is 4,096: ramp
            n = min(250, count - start)
            tasks.extend(asyncio.create_task(_drip(service.port, conns, stop)) for _ in range(n))
            await wait_until(lambda: len(conns) >= start + n, 10, 0.02)
        all_open = time.monotonic()
        fds_open = service.fds()
        probes = [await head_status(service.port, "/healthz", timeout=5) for _ in range(5)]
        # Wait (bounded) for the server to close them all, then stop dripping.
        await wait_until(lambda: all(c[1] for c in conns), limit + 10, 0.2)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        delays = sorted(c[1] - c[0] for c in conns if c[1])
        in_time = sum(1 for d in delays if d <= limit)
        result.figures.update(
            opened=len(conns), closed_by_server=len(delays), closed_within_15s=in_time,
            close_delay_p50_s=round(delays[len(delays) // 2], 1) if delays else None,
            close_delay_max_s=round(delays[-1], 1) if delays else None,
            healthz=[(s, round(t, 3)) for s, t in probes], fds_while_open=fds_open - base.fds,
            watched_s=round(time.monotonic() - all_open, 1))
        await base.deltas(result)
    failures = []
    if len(conns) < count:
        failures.append(f"only {len(conns)} of {count} connections opened")
    if in_time < len(conns):
        failures.append(f"{len(conns) - in_time} of {len(conns)} connections still open "
                        f"{limit:.0f} s after their first header line")
    slow = [(s, round(t, 2)) for s, t in probes if s != 200 or t > 1.0]
    if slow:
        failures.append(f"/healthz under the flood: {slow}")
    return result.judge(failures)


async def _drip(port: int, conns: list[list[float]], stop: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    record = [time.monotonic(), 0.0]
    conns.append(record)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(10):  # at most 100 s; the scenario stops it far earlier
            try:
                await asyncio.wait_for(reader.read(1024), timeout=10)
                break  # EOF, or an answer (then the server closes): either way, it acted
            except TimeoutError:
                if stop.is_set():
                    return
                writer.write(f"X-Drip-{i}: 1\r\n".encode())
        record[1] = time.monotonic()
    except OSError:
        record[1] = time.monotonic()
    finally:
        writer.transport.abort()


# --- 9. CR/LF in a table name -----------------------------------------------------------

CRLF_NAME = 'x\nid: 7.bogus\ndata: {"forged":1}'


async def crlf_table(run: Run) -> Result:
    result = Result("crlf_table_name", 'table "x\\nid: 7.bogus\\ndata: {"forged":1}"; '
                    "watch it (default and explicit topic), 3 rows, live + replayed")
    topic = "chaos_crlf"
    quoted = '"' + CRLF_NAME.replace('"', '""') + '"'
    attempts: dict[str, str] = {}
    clients: list[SseClient] = []
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        await conn.execute(f"CREATE TABLE public.{quoted} (id int PRIMARY KEY)")
        oid = await conn.fetchval("SELECT oid FROM pg_class WHERE relname = $1", CRLF_NAME)
        for label, args in (("default topic", ""), ("topic chaos_crlf", f", '{topic}'")):
            try:
                await conn.execute(f"SELECT realtime.watch({oid}::regclass{args})")
                attempts[label] = "watched"
            except asyncpg.PostgresError as exc:
                attempts[label] = f"refused: {exc.sqlstate} {str(exc)[:120]!r}"
        result.figures["watch"] = attempts
        watched = any(v == "watched" for v in attempts.values())
        if watched:
            head = await last_position(conn)
            clients = await live_clients(service, conn, topic, 2)
            tasks = await run_clients(clients, 30)
            await wait_clients(service, 2)
            await conn.execute(f"INSERT INTO public.{quoted} SELECT generate_series(1, 3)")
            end = await publish_end(conn, topic, clients)
            await finish(tasks, 20)
            replay = SseClient(service.port, topic, last_id=str(head))
            if end is not None:
                replay.end_at(end)
            await finish(await run_clients([replay], 20), 25)
            clients.append(replay)
            received = [sum(1 for i in c.items if i[0] == "e") for c in clients]
            result.figures["events_received"] = received
            result.resets = sum(c.resets for c in clients)
            result.dropped = sum(1 for c in clients if c.drops)
        result.figures["forged_frames"] = sum(len(c.forged) for c in clients)
        result.figures["forged_examples"] = [f.decode(errors="replace")
                                             for c in clients for f in c.forged][:3]
        await base.deltas(result)
    result.lost = result.duplicated = result.reordered = None
    failures = []
    if result.figures["forged_frames"]:
        failures.append(f"{result.figures['forged_frames']} frames with a forged id/data line")
    if watched and any(n != 3 for n in result.figures.get("events_received", [])):
        failures.append(f"watched, but clients got {result.figures['events_received']} of 3 events")
    return result.judge(failures)


# --- 10. sequencing burst after an idle inbox ------------------------------------------


async def sequencing_burst(run: Run) -> Result:
    runs, burst, idle = 5, 30_000, (2.0 if run.quick else 5.0)
    result = Result("sequencing_burst", f"{runs} runs: {burst:,} events in one transaction "
                    f"after {idle:.0f} s idle").no_stream()
    topic = "chaos_burst"
    times: list[float | None] = []
    fanned: list[float | None] = []
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        for _ in range(runs):
            await wait_until(lambda: inbox_empty(conn), 30, 0.1)
            await asyncio.sleep(idle)  # the fault itself: an idle inbox, not a synchronisation
            head = await last_position(conn)
            await conn.execute("SELECT realtime.publish($1, 'chaos.x', jsonb_build_object('n', g)) "
                               "FROM generate_series(1, $2::int) g", topic, burst)
            t0 = time.monotonic()
            ok = await wait_sequenced(conn, head + burst, 12)  # bounded: "over 12 s"
            times.append(round(time.monotonic() - t0, 2) if ok else None)

            async def fanned_out() -> bool:
                return int((await service.stats())["position"]) >= head + burst
            ok = await wait_until(fanned_out, 5, 0.02)
            fanned.append(round(time.monotonic() - t0, 2) if ok else None)
        await base.deltas(result)
    result.figures.update(sequenced_s=times, stats_position_s=fanned)
    slow = [t for t in times if t is None or t > 3.0]
    failures = [f"{len(slow)} of {runs} bursts sequenced in over 3 s: {times}"] if slow else []
    return result.judge(failures)
