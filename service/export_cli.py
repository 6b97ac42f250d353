"""``pgsse export NAME --format csv|ndjson --param k=v … [--resume FILE]``: a client of
``GET /aggregates/{name}?format=…`` that writes rows to stdout (or continues FILE in place)
with a progress bar on stderr.

It splits the body into records itself (CSV quotes may hold line breaks), so it counts rows
exactly, keeps marker and trailer lines out of the output, and knows the last complete row:
``--resume FILE`` drops a cut last record, asks for ``after=<its key>`` (the key columns come
from ``X-Export-Key``) and appends the rest. Exit status: 0 done; 1 the export broke off
(resumable); 2 the request was refused (bad name, parameter, token) or the options are wrong.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

CSV_MARKER = b"#pgsse-export-error"
NDJSON_MARKER = b'{"@pgsse":'


class ExportFailed(Exception):
    """The export could not be completed; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Records:
    """Splits a body into complete records: CSV rows end at a CRLF outside quotes."""

    def __init__(self, fmt: str) -> None:
        self.csv = fmt == "csv"
        self.end = b"\r\n" if self.csv else b"\n"
        self.tail = b""  # the start of a record not yet complete

    def feed(self, data: bytes) -> Iterator[bytes]:
        buffer = self.tail + data
        start = scan = 0
        quoted = False
        end = self.end
        while True:
            cut = buffer.find(end, scan)
            if cut == -1:
                break
            if self.csv:
                quoted ^= buffer.count(b'"', scan, cut) & 1 == 1
                if quoted:  # a line break inside a quoted cell
                    scan = cut + len(end)
                    continue
            yield buffer[start:cut + len(end)]
            start = scan = cut + len(end)
        self.tail = buffer[start:]


def scan_file(path: str, fmt: str) -> tuple[int, bytes | None, bytes | None, int]:
    """(bytes of complete rows, header record, last data record, data rows) of a partial file.

    Marker and trailer lines, and a cut last record, are not counted."""
    records = Records(fmt)
    good = offset = rows = 0
    header: bytes | None = None
    last: bytes | None = None
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            for record in records.feed(chunk):
                offset += len(record)
                if record.startswith(CSV_MARKER if fmt == "csv" else NDJSON_MARKER):
                    break
                if fmt == "csv" and header is None:
                    header = record
                else:
                    last = record
                    rows += 1
                good = offset
            else:
                continue
            break
    return good, header, last, rows


def after_value(fmt: str, key: list[str], header: bytes | None, last: bytes,
                csv_safe: bool = False) -> str:
    """``after=`` for the last row written: its key as a JSON array. ``csv_safe``: the
    service put a ``'`` before cells a spreadsheet would evaluate (and before a leading
    ``'``); one such ``'`` is dropped to get the value back."""
    if fmt == "ndjson":
        row = json.loads(last)
        values = [row[k] for k in key]
    else:
        names = next(csv.reader(io.StringIO((header or b"").decode())))
        if csv_safe:
            names = [n[1:] if n.startswith("'") else n for n in names]
        cells = next(csv.reader(io.StringIO(last.decode())))
        values = [cells[names.index(k)] for k in key]
        if csv_safe:
            values = [v[1:] if v.startswith("'") else v for v in values]
    return json.dumps(values, separators=(",", ":"))


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"


def export(args: argparse.Namespace) -> None:
    import httpx
    from tqdm import tqdm  # type: ignore[import-untyped]

    params: list[tuple[str, str | int | float | bool | None]] = [("format", args.format)]
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExportFailed(f"--param takes key=value, got {item!r}", 2)
        params.append((key, value))
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    url = f"{args.url.rstrip('/')}/aggregates/{args.name}"
    out: IO[bytes]
    skip_header = False
    with httpx.Client(timeout=httpx.Timeout(30.0, read=120.0), headers=headers) as client:
        if args.resume and os.path.exists(args.resume):
            good, header, last, done = scan_file(args.resume, args.format)
            probe = client.head(url, params=params)
            if probe.status_code != 200:
                response_error(client.get(url, params=params))
            key = json.loads(probe.headers.get("x-export-key", "[]"))
            if last is not None:
                if not key:
                    raise ExportFailed(f"{args.name} declares no '-- export: order by' key: "
                                       "it cannot be resumed; export it again", 2)
                safe = probe.headers.get("x-export-csv-safe") == "true"
                params.append(("after", after_value(args.format, key, header, last, safe)))
            skip_header = header is not None
            out = open(args.resume, "r+b")  # noqa: SIM115 - closed below
            out.truncate(good)
            out.seek(good)
            print(f"resuming {args.resume} after {done} rows", file=sys.stderr)
        elif args.resume:
            out = open(args.resume, "wb")  # noqa: SIM115 - closed below
        else:
            out = sys.stdout.buffer
        try:
            with client.stream("GET", url, params=params) as response:
                if response.status_code != 200:
                    response.read()
                    response_error(response)
                stream(response, out, args, skip_header, tqdm)
        except httpx.HTTPError as exc:
            raise ExportFailed(f"the connection broke off: {exc!r}" + resume_hint(args)) from exc
        finally:
            out.flush()
            if out is not sys.stdout.buffer:
                out.close()


def stream(response: Any, out: IO[bytes], args: argparse.Namespace, skip_header: bool,
           tqdm: Any) -> None:
    fmt = args.format
    total = response.headers.get("x-total-count")
    position = response.headers.get("x-export-position", "?")
    records = Records(fmt)
    rows = size = 0
    header_pending = fmt == "csv"
    ended = fmt == "csv"  # a CSV body ends when the data does; NDJSON needs its trailer
    started = time.monotonic()
    bar = tqdm(total=int(total) if total and total.isdigit() else None, unit=" rows",
               unit_scale=True, file=sys.stderr, desc=args.name, dynamic_ncols=True,
               mininterval=0.25)
    with bar:
        for chunk in response.iter_bytes():
            kept: list[bytes] = []
            added = 0
            for record in records.feed(chunk):
                if header_pending:
                    header_pending = False
                    if not skip_header:
                        kept.append(record)
                    continue
                if record.startswith(CSV_MARKER) or (
                        fmt == "ndjson" and record.startswith(NDJSON_MARKER)):
                    trailer = marker(record, fmt)
                    if trailer.get("@pgsse") == "end":
                        ended = True
                        continue
                    out.write(b"".join(kept))
                    raise ExportFailed(f"the export failed after {rows} rows: "
                                       f"{trailer.get('message', '')}" + resume_hint(args))
                kept.append(record)
                added += 1
            rows += added
            data = b"".join(kept)
            out.write(data)
            size += len(data)
            bar.update(added)
            bar.set_postfix_str(human(size), refresh=False)
    if records.tail or not ended:
        raise ExportFailed(f"the body ended without its last line after {rows} rows"
                           + resume_hint(args))
    elapsed = time.monotonic() - started
    print(f"exported {rows} rows, {human(size)} of {args.name} at position {position} in "
          f"{elapsed:.1f} s", file=sys.stderr)


def marker(record: bytes, fmt: str) -> dict[str, Any]:
    if fmt == "ndjson":
        try:
            found = json.loads(record)
        except ValueError:
            return {"@pgsse": "error", "message": record.decode(errors="replace").strip()}
        return found if isinstance(found, dict) else {}
    return {"@pgsse": "error", "message": record.decode(errors="replace").strip()}


def response_error(response: Any) -> None:
    try:
        error = response.json()["error"]
        message = f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        message = response.text[:200].strip() or response.reason_phrase
    raise ExportFailed(f"HTTP {response.status_code}: {message}",
                       2 if 400 <= response.status_code < 500 and response.status_code != 429 else 1)


def resume_hint(args: argparse.Namespace) -> str:
    return "; continue it with --resume FILE" if not args.resume else f"; run again to continue {args.resume}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the aggregate")
    p.add_argument("--format", choices=("csv", "ndjson"), default="csv")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="an aggregate parameter (repeatable); fields=a,b keeps those columns")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)")
    p.add_argument("--token", help="a JWT when the service has AUTH_SECRET set")
    p.add_argument("--resume", metavar="FILE",
                   help="write to FILE; if it holds part of this export, continue it in place")


def run(args: argparse.Namespace) -> None:
    try:
        export(args)
    except ExportFailed as exc:
        print(f"pgsse export: {exc}", file=sys.stderr)
        raise SystemExit(exc.status) from exc
    except KeyboardInterrupt:
        print("pgsse export: interrupted" + resume_hint(args), file=sys.stderr)
        raise SystemExit(130) from None
