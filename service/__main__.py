"""``pgsse serve | migrate | demo | token | db`` (also ``python -m pgsse …``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import export_cli
from .settings import ConfigError, Settings

if TYPE_CHECKING:
    from . import workers


def _settings(**overrides: object) -> Settings:
    try:
        return Settings.from_env(None, **overrides)
    except ConfigError as exc:
        print(f"pgsse: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    from . import embedded

    return embedded.start(settings.data_dir)


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that what must happen on the way out happens
    (stopping the embedded PostgreSQL); the process then dies of the signal all the same."""

    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.signal = sig


def _raise_terminated(sig: int, frame: FrameType | None) -> None:
    raise Terminated(sig)


@contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The database URL; an embedded PostgreSQL is stopped on every way out of the block
    (exit, Ctrl-C, SIGTERM; not SIGKILL: ``pgsse db --stop`` is for that), unless another
    live process uses it (embedded.py)."""
    if settings.database_url:
        yield settings.database_url
        return
    from . import embedded

    print(f"  embedded PostgreSQL in {embedded.pgdata(settings.data_dir)} (stopped when pgsse "
          "serve exits; data kept)", file=sys.stderr, flush=True)
    try:
        yield embedded.start(settings.data_dir)
    finally:
        embedded.release(settings.data_dir)


def serve(args: argparse.Namespace) -> None:
    from . import logs, workers

    settings = _settings(**({"demo": True} if args.demo else {}))
    logs.setup(settings.log_level, settings.log_format)
    worker = workers.Worker.from_env()
    if worker is not None:  # the supervisor owns the database (DATABASE_URL is set for us)
        worker.follow_parent()
        worker.join_metrics()
        _serve_one(settings, worker, _database_url(settings))
        return
    # uvicorn and the supervisor end by raising the signal they got again: with this handler
    # restored under them, a SIGTERM ends here as an exception, after the cleanup below.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with _database(settings) as url:
            if settings.workers > 1:
                _print_demo_banner(settings)
                workers.Supervisor(settings, url).run()
            else:
                _serve_one(settings, None, url)
    except Terminated as exc:
        signal.signal(exc.signal, signal.SIG_DFL)
        signal.raise_signal(exc.signal)  # die of it, like a plain uvicorn process


def _print_demo_banner(settings: Settings) -> None:
    if settings.demo:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        base = f"http://{host}:{settings.port}"
        print(f"\n  pgsse demo dashboard: {base}/\n  try: curl -N '{base}/events?topic=orders'\n",
              file=sys.stderr, flush=True)


def _serve_one(settings: Settings, worker: workers.Worker | None, url: str) -> None:
    """One uvicorn process: the whole service, or one worker of ``WORKERS=N``."""
    import uvicorn

    from . import protocol
    from .app import create_app
    from .sqlfiles import AggregateFileError

    # Each fan-out allocates per client; with 10k long-lived streams the default young
    # generation threshold runs the collector so often that it doubles fan-out latency.
    gc.set_threshold(50_000, 20, 100)
    try:
        app = create_app(settings, url)
    except AggregateFileError as exc:
        print(f"pgsse: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    lifecycle = app.lifecycle

    class Server(uvicorn.Server):
        metrics_server: asyncio.AbstractServer | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Streams never finish on their own: end them before uvicorn waits for them.
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lifecycle.drain)
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            if worker is not None:  # from the first moment the loop runs (workers.py)
                worker.start_heartbeat(settings.worker_timeout_seconds)
            await super().startup(sockets)
            if worker is not None:
                self.metrics_server = await worker.serve_metrics()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if self.metrics_server is not None:
                self.metrics_server.close()
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None,
        proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds), backlog=4096,
        timeout_keep_alive=15, server_header=False, access_log=False,
        **protocol.uvicorn_kwargs(settings.header_timeout_seconds),
    )
    if worker is None:
        _print_demo_banner(settings)
    try:
        Server(config).run(sockets=None if worker is None else [worker.listening_socket()])
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after its clean shutdown: no traceback for that.
        raise SystemExit(130) from None


def migrate(args: argparse.Namespace) -> None:
    from . import db

    settings = _settings()
    url = _database_url(settings)

    async def run() -> list[str]:
        conn = await db.connect(url)
        try:
            return await db.migrate(conn)
        finally:
            await conn.close()

    try:
        applied = asyncio.run(run())
    except db.MigrationError as exc:
        print(f"pgsse: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("up to date: every migration was already applied")


def demo(args: argparse.Namespace) -> None:
    from . import db
    from . import demo as demo_module

    settings = _settings()
    url = _database_url(settings)

    async def run() -> None:
        conn = await db.connect(url)
        try:
            await db.migrate(conn)
            await demo_module.install(conn, orders=args.orders)
            if args.write:
                await demo_module.Writer(url, args.rate).run(asyncio.Event())
        finally:
            await conn.close()

    asyncio.run(run())
    print("demo schema and data loaded")


def token(args: argparse.Namespace) -> None:
    from .auth import mint
    from .auth.tokens import load_signing_key

    settings = _settings()
    signing_key: object
    if args.key:  # a private key PEM: the algorithm follows from its type (issue 21)
        try:
            signing_key, algorithm = load_signing_key(Path(args.key).read_bytes(), args.alg)
        except (OSError, ValueError) as exc:
            print(f"pgsse: --key {args.key}: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
    elif args.alg not in (None, "HS256"):
        print(f"pgsse: --alg {args.alg} needs --key PRIVATE_KEY.pem", file=sys.stderr)
        raise SystemExit(2)
    elif not settings.auth_secret:
        print("pgsse: AUTH_SECRET is not set; cannot sign a token (or give --key)",
              file=sys.stderr)
        raise SystemExit(2)
    else:
        signing_key, algorithm = settings.auth_secret[0], "HS256"
    extra: dict[str, object] = {}
    for claim in args.claim:
        key, sep, value = claim.partition("=")
        if not sep or not key:
            print(f"pgsse: --claim takes key=value, got {claim!r}", file=sys.stderr)
            raise SystemExit(2)
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    if args.sub:
        extra["sub"] = args.sub
    topics = [t for part in args.topics for t in part.split(",") if t]
    print(mint(signing_key, topics, args.ttl, extra, algorithm=algorithm, kid=args.kid))


def advise(args: argparse.Namespace) -> None:
    from . import advise as advise_cli

    settings = _settings()
    raise SystemExit(advise_cli.run(args, settings, _database_url(settings)))


def database(args: argparse.Namespace) -> None:
    settings = _settings()
    if args.stop:
        from . import embedded

        if settings.database_url:
            print("pgsse: DATABASE_URL is set: there is no embedded PostgreSQL to stop",
                  file=sys.stderr)
            raise SystemExit(2)
        result = embedded.stop(settings.data_dir)
        if not result.gone:
            pid = f"pid {result.pid}" if result.pid is not None else "pid unknown"
            print(f"pgsse: could not stop the embedded PostgreSQL ({pid}, "
                  f"{embedded.pgdata(settings.data_dir)}): {result.error}", file=sys.stderr)
            raise SystemExit(1)
        if result.pid is None:
            print("embedded PostgreSQL is not running")
        else:
            print(f"embedded PostgreSQL stopped (pid {result.pid})")
        return
    url = _database_url(settings)
    print(url)
    if not settings.database_url:
        print("(the embedded PostgreSQL keeps running: `make stop` or `pgsse db --stop`)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pgsse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve HTTP (configuration from the environment; see README)")
    p.add_argument("--demo", action="store_true", help="load the demo, run its writer, serve the dashboard (DEMO=1)")
    p.set_defaults(func=serve)
    p = sub.add_parser("migrate", help="create or update the realtime schema (idempotent)")
    p.set_defaults(func=migrate)
    p = sub.add_parser("demo", help="load the demo schema and data")
    p.add_argument("--orders", type=int, default=2000, help="orders to seed when the table is empty")
    p.add_argument("--write", action="store_true", help="then run the demo writer until interrupted")
    p.add_argument("--rate", type=float, default=5.0, help="writer changes per second")
    p.set_defaults(func=demo)
    p = sub.add_parser("token", help="mint a JWT signed with the first AUTH_SECRET key, or --key")
    p.add_argument("--topics", action="append", default=[], help="granted topic (repeatable or comma-separated; * for all)")
    p.add_argument("--ttl", type=float, default=3600, help="seconds until it expires")
    p.add_argument("--claim", action="append", default=[], help="extra claim key=value (value parsed as JSON when it can be)")
    p.add_argument("--sub", help="subject claim")
    p.add_argument("--key", help="sign with this private key (PEM: RSA, EC P-256/P-384 or Ed25519) instead of AUTH_SECRET")
    p.add_argument("--alg", help="RS256/384/512, PS256/384/512 with an RSA key; else taken from the key's type (ES256, ES384, EdDSA)")
    p.add_argument("--kid", help="key id put in the token's header (the kid your JWKS lists)")
    p.set_defaults(func=token)
    p = sub.add_parser("export", help="stream an aggregate as CSV or NDJSON from a running service")
    export_cli.add_arguments(p)
    p.set_defaults(func=export_cli.run)
    p = sub.add_parser("advise", help="EXPLAIN every aggregate and suggest the indexes it lacks (exit 1 on findings)")
    from . import advise as advise_cli

    advise_cli.add_arguments(p)
    p.set_defaults(func=advise)
    # issue 23: pgsse tail, a Python subscriber on the command line
    from . import tail

    p = sub.add_parser("tail", help="print the events of topics as JSON lines, resuming across reconnects")
    tail.add_arguments(p)
    p.set_defaults(func=tail.run)
    p = sub.add_parser("db", help="print the database URL (starting the embedded PostgreSQL if DATABASE_URL is unset)")
    p.add_argument("--stop", action="store_true", help="stop the embedded PostgreSQL instead")
    p.set_defaults(func=database)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
