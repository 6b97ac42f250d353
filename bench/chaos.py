"""``make chaos`` / ``python -m bench.chaos [--quick] [--only name,name]`` — the loss and
chaos suite.

Runs fault scenarios against a real ``python -m pgsse serve`` (one subprocess per scenario,
on a fresh database) and a real PostgreSQL (embedded under .data/chaos, or
``CHAOS_DATABASE_URL`` / ``DATABASE_URL``, which must be a superuser), everything on
127.0.0.1, and prints one table: scenario, load, lost, duplicated, reordered, resets,
dropped clients, RSS and fd delta, pass/fail. Writes bench/results/chaos/chaos.json and
chaos.png (per scenario: delivery and lag over time, the fault marked) and
chaos_table.png; exits non-zero when any scenario fails.

``--ref REV`` runs the service exported from a git revision (under .data/chaos/src)
instead of the work tree, so a run measures committed code while others edit.

Loss is judged per client against what PostgreSQL committed (``realtime.events``, read
before any prune): a committed position a client never received is *lost* unless an
``event: reset`` covering it arrived before the stream moved past it. Scenarios and what
passing means are in ``bench/chaos_scenarios.py`` (1–4),
``bench/chaos_faults.py`` (5–10), ``bench/chaos_guards.py`` (11) and
``bench/chaos_schema.py`` (schema changes, issue 19),
``bench/chaos_roles.py`` (the service's role read-only; pruning under a role timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from . import (
    chaos_faults,
    chaos_guards,
    chaos_infra,
    chaos_roles,
    chaos_scenarios,
    chaos_schema,
)
from .chaos_infra import RESULTS, Postgres, log, raise_nofile
from .chaos_scenarios import Result, Run
from .loadclient import install_uvloop

SCENARIOS: dict[str, Callable[[Run], Awaitable[Result]]] = {
    "prune_listener_away": chaos_scenarios.prune_listener_away,
    "prune_mid_replay": chaos_scenarios.prune_mid_replay,
    "bulk_transaction": chaos_scenarios.bulk,
    "zombie_sockets": chaos_scenarios.zombies,
    "param_flood": chaos_faults.param_flood,
    "readiness": chaos_faults.readiness,
    "claims": chaos_faults.claims,
    "header_timeout": chaos_faults.header_timeout,
    "crlf_table_name": chaos_faults.crlf_table,
    "sequencing_burst": chaos_faults.sequencing_burst,
    "backend_kill_storm": chaos_guards.kill_storm,
    "refused_logins": chaos_guards.refused_logins,
    "postgres_restart": chaos_guards.postgres_restart,
    "connection_churn": chaos_guards.churn,
    "schema_changes": chaos_schema.schema_changes,  # issue 19
    "unwatch_cached_aggregate": chaos_schema.unwatch_cached_aggregate,  # issue 19
    # issue 19
    "read_only_role": chaos_roles.read_only_role,
    "prune_role_timeout": chaos_roles.prune_role_timeout,
    "stuck_exporters": chaos_scenarios.stuck_exporters,
    "frozen_worker": chaos_scenarios.frozen_worker,
    "sigterm_frozen_worker": chaos_scenarios.sigterm_frozen_worker,
    "slow_aggregate_storm": chaos_scenarios.slow_aggregate_storm,
}

COLUMNS = ("scenario", "load", "lost", "dup", "reord", "resets", "dropped", "RSS Δ MB",
           "fd Δ", "result")


def row(result: Result) -> list[str]:
    def num(value: Any) -> str:
        return "-" if value is None else str(value)

    return [result.scenario, result.load, num(result.lost), num(result.duplicated),
            num(result.reordered), num(result.resets), num(result.dropped),
            num(result.rss_delta_mb), num(result.fd_delta),
            "PASS" if result.passed else "FAIL"]


def table(results: list[Result], load_width: int = 60) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in results]
    for r in rows:
        if len(r[1]) > load_width:
            r[1] = r[1][:load_width - 1] + "…"
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w)
                               for j, (cell, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [result for result in results if not result.passed]
    if failed:
        lines.append("")
        for result in failed:
            lines.append(f"FAIL {result.scenario}: {result.verdict}")
    return "\n".join(lines)


def plot_table(results: list[Result], path: Any, title: str) -> None:
    """The summary table as an image (chaos_table.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = COLUMNS
    cells = [row(r) for r in results]
    for cell in cells:
        if len(cell[1]) > 48:
            cell[1] = cell[1][:47] + "…"
    notes = [f"FAIL {r.scenario}: {r.verdict}"[:170] for r in results if not r.passed]
    fig, ax = plt.subplots(figsize=(13, 0.32 * (len(cells) + len(notes) + 3) + 0.6))
    ax.axis("off")
    tbl = ax.table(cellText=cells, colLabels=cols, loc="center", cellLoc="center")
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(8)
    tbl.auto_set_column_width(list(range(len(cols))))
    for i, r in enumerate(results, start=1):
        colour = "#c8efc8" if r.passed else "#f5c2c2"
        tbl[i, len(cols) - 1].set_facecolor(colour)
        tbl[i, 0].set_facecolor(colour)
        tbl[i, 1].get_text().set_horizontalalignment("left")
    for j in range(len(cols)):
        tbl[0, j].set_facecolor("#dddddd")
    ax.set_title(title, fontsize=10)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: list[Result], path: Any, title: str) -> None:
    """One panel per scenario, over the scenario's own seconds: events delivered per second
    to all its clients (bars) and their lag, write → arrival, p50 and max (lines, log scale);
    the fault's marks as red lines, drops (a stream closed by the server) and resets as ticks.
    A scenario without an event stream shows its marks and figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = max(1, -(-len(results) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.1 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results, strict=False):
        line = result.timeline or {}
        colour = "#2e7d32" if result.passed else "#c62828"
        ax.set_title(f"{result.scenario} — {'PASS' if result.passed else 'FAIL'}", fontsize=9,
                     color=colour)
        if line.get("t"):
            step = line["step_s"]
            ax.bar(line["t"], line["events_per_s"], width=step, align="edge", color="#90caf9",
                   label="events/s delivered")
            ax.set_ylabel("events/s", fontsize=7)
            lag = ax.twinx()
            for key, style, label in (("lag_p50_ms", "-", "lag p50"), ("lag_max_ms", ":", "lag max")):
                points = [(t + step / 2, v) for t, v in zip(line["t"], line[key], strict=True)
                          if v is not None]
                if points:
                    lag.plot(*zip(*points, strict=True), style, color="#ef6c00", lw=1, label=label)
            lag.set_yscale("symlog", linthresh=10)
            lag.set_ylabel("lag ms", fontsize=7)
            lag.tick_params(labelsize=6)
            for t in line.get("drops", []):
                ax.axvline(t, ymax=0.08, color="#6a1b9a", lw=0.8)
            for t in line.get("resets", []):
                ax.axvline(t, ymin=0.92, color="#00838f", lw=0.8)
        else:
            text = "\n".join(f"{k}: {v}"[:60] for k, v in list(result.figures.items())[:8])
            ax.text(0.02, 0.95, text or "(no event stream)", transform=ax.transAxes, va="top",
                    fontsize=6, family="monospace")
        for at, label in result.marks:
            ax.axvline(at, color="#c62828", ls="--", lw=1)
            ax.text(at, 1.0, f" {label}", transform=ax.get_xaxis_transform(), fontsize=6,
                    color="#c62828", va="top", rotation=90)
        ax.set_xlabel("s since the scenario began", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.suptitle(title + " — bars: events/s; orange: lag p50 (—) and max (··); red: fault; "
                 "purple ticks: drops; teal ticks: resets", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def git_head(ref: str) -> str:
    try:
        return subprocess.run(["git", "log", "-1", "--format=%h %s", ref], capture_output=True,
                              text=True, timeout=10, cwd=RESULTS.parent.parent.parent
                              ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


async def run(args: argparse.Namespace) -> int:
    names = list(SCENARIOS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in SCENARIOS]
        if unknown:
            log(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
            return 2
        names = wanted
    RESULTS.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    if args.ref:
        chaos_infra.SERVICE_SOURCE = chaos_infra.export_revision(args.ref)
        log(f"service from {args.ref}: {chaos_infra.SERVICE_SOURCE}")
    started = time.monotonic()
    pg = Postgres()
    results: list[Result] = []
    try:
        await pg.start()
        for name in names:
            log(f"{name} …")
            t0 = time.monotonic()
            chaos_infra.WRITTEN_AT.clear()
            try:
                async with asyncio.timeout(args.scenario_timeout):
                    result = await SCENARIOS[name](Run(pg, args.quick))
            except Exception as exc:  # a broken scenario is a failed scenario, not a crash
                log(traceback.format_exc())
                result = Result(name, "").judge([f"scenario error: {exc!r}"[:300]])
            result.seconds = round(time.monotonic() - t0, 1)
            results.append(result)
            log(f"{name}: {'PASS' if result.passed else 'FAIL'} in {result.seconds}s — "
                f"{result.verdict}; {json.dumps(result.figures, default=str)[:600]}")
    finally:
        await pg.close()
    elapsed = round(time.monotonic() - started, 1)
    head = git_head(args.ref or "HEAD") + ("" if args.ref else " (+ work tree)")
    report = {
        "suite": "pgsse chaos",
        "quick": args.quick,
        "git": head,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": "external" if pg.external else "embedded",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": elapsed,
        "passed": all(r.passed for r in results),
        "scenarios": [r.__dict__ for r in results],
    }
    (RESULTS / "chaos.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = (f"pgsse chaos suite{' (--quick)' if args.quick else ''} — {head[:60]} — "
             f"{os.cpu_count()} cores, {elapsed:.0f} s")
    plot(results, RESULTS / "chaos.png", title)
    plot_table(results, RESULTS / "chaos_table.png", title)
    print(table(results))
    print(f"\n{sum(r.passed for r in results)}/{len(results)} passed in {elapsed:.0f} s; "
          f"{RESULTS / 'chaos.json'}, {RESULTS / 'chaos.png'}")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter loads (development)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    parser.add_argument("--ref", help="run the service from this git revision (exported "
                        "under .data/chaos/src) instead of the work tree")
    parser.add_argument("--scenario-timeout", type=float, default=240.0,
                        help="hard limit per scenario, seconds (default 240)")
    args = parser.parse_args(argv)
    install_uvloop()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
