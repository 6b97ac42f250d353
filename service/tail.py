"""``pgsse tail TOPIC… [--url URL] [--from ID] [--token T] [--count N]``: one JSON line per
event (``{"id", "type", "topic", "data"}``), resuming across reconnects like any
``pgsse.Client``. Exit status: 0 after ``--count`` events or Ctrl-C; 2 when the service
refuses the stream (a bad topic, a token that is not granted)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topic to follow (and everything below it)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL (default %(default)s)")
    parser.add_argument("--from", dest="from_id", type=int, metavar="ID",
                        help="resume after this event id (0: everything retained)")
    parser.add_argument("--token", help="a JWT for a service with AUTH_SECRET")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N events")


async def follow(args: argparse.Namespace) -> None:
    from .subscriber import Client

    seen = 0
    if args.count is not None and args.count <= 0:
        return
    async with Client(args.url, args.topics, token=args.token, last_event_id=args.from_id) as client:
        async for event in client:
            print(json.dumps({"id": event.id, "type": event.type, "topic": event.topic,
                              "data": event.data}, ensure_ascii=False), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return


def run(args: argparse.Namespace) -> None:
    from .subscriber import ClientError

    try:
        asyncio.run(follow(args))
    except ClientError as exc:
        print(f"pgsse: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:
        print(f"pgsse: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
