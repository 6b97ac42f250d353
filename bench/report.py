"""Targets with pass/fail, PNG plots (matplotlib, Agg) and the short stdout table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIB = 1024


def _fanout(report: dict[str, Any], side: str) -> list[dict[str, Any]]:
    rows = report.get("scenarios", {}).get("streams", {}).get(side, {}).get("fanout", [])
    return sorted((r for r in rows if "cpu_per_delivery_us" in r), key=lambda r: r["clients"])


def _idle(report: dict[str, Any], side: str) -> list[dict[str, Any]]:
    return report.get("scenarios", {}).get("streams", {}).get(side, {}).get("idle", [])


def _commit(report: dict[str, Any], side: str) -> dict[str, Any] | None:
    res = report.get("scenarios", {}).get("streams", {}).get(side, {}).get("commit_latency")
    return res if isinstance(res, dict) and "latency" in res else None


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    quick = report["meta"]["quick"]

    def add(name: str, target: str, value: Any, unit: str, ok: bool | None, note: str = "") -> None:
        entry = {"target": name, "threshold": target, "measured": value, "unit": unit,
                 "pass": ok}
        if note:
            entry["note"] = note
        out.append(entry)

    fan = _fanout(report, "pgsse")
    for row in fan:
        v = row["cpu_per_delivery_us"]
        add(f"fan-out CPU per delivery at {row['clients']} clients", "<= 20", v, "µs",
            v is not None and v <= 20)
    if fan:
        top = fan[-1]
        p99 = top["latency"]["p99_ms"]
        note = "" if top["clients"] >= 10_000 else f"quick run: measured at {top['clients']} clients, target is for 10k"
        add(f"fan-out p99 at {top['clients']} clients", "<= 250", p99, "ms",
            p99 is not None and p99 <= 250, note)
    idle = _idle(report, "pgsse")
    if idle:
        top = idle[-1]
        v = top["rss_per_connection_kib"]
        note = "kB as /proc reports it (KiB)"
        if top["clients"] < 10_000:
            note += f"; quick run: measured at {top['clients']} clients, target is for 10k"
        add(f"RSS per idle connection at {top['clients']}", "<= 15", v, "kB",
            v is not None and v <= 15, note)
    commit = _commit(report, "pgsse")
    if commit:
        lat = commit["latency"]
        note = f"{commit['clients']} clients, {commit['achieved_tx_per_s']} tx/s"
        add("commit→client p50", "<= 15", lat["p50_ms"], "ms",
            lat["p50_ms"] is not None and lat["p50_ms"] <= 15, note)
        add("commit→client p99", "<= 100", lat["p99_ms"], "ms",
            lat["p99_ms"] is not None and lat["p99_ms"] <= 100, note)
    writer = report.get("scenarios", {}).get("writer", {})
    ratios = writer.get("ratio_vs_unwatched", {}) if isinstance(writer, dict) else {}
    for op in ("insert", "update"):
        spread = ratios.get(f"{op}_stmt")
        if spread:
            v = round(100 * spread["median"], 1)
            add(f"writer tps watched/unwatched, {op}, 8 clients, service running (median)",
                ">= 70", v, "%", v >= 70,
                f"min {round(100 * spread['min'], 1)} / max {round(100 * spread['max'], 1)} % "
                f"over {spread['n']} rounds, unpinned")
    bulk = ratios.get("bulk_cost_stmt")
    if bulk:
        add("10,000-row INSERT ... SELECT, watched ms / unwatched ms (median)", "<= 2.0",
            bulk["median"], "x", bulk["median"] <= 2.0,
            f"min {bulk['min']} / max {bulk['max']} over {bulk['n']} rounds")
    agg = report.get("scenarios", {}).get("aggregates", {})
    pg = agg.get("pgsse", {}) if isinstance(agg, dict) else {}
    if isinstance(pg, dict) and isinstance(pg.get("304"), dict) and "rps" in pg["304"]:
        r = pg["304"]
        add("304 requests/s on one server core", ">= 10000", r["rps"], "req/s",
            r["rps"] >= 10_000, f"server core utilisation {r['window']['server_core_utilisation']}")
        add("queries during the 304 run", "== 0", r["queries"], "queries", r["queries"] == 0)
    if isinstance(pg, dict) and isinstance(pg.get("polling"), dict):
        p = pg["polling"]
        add("queries per change per key while polling", "<= 1", p["queries_per_change"],
            "queries/change", p["queries_per_change"] is not None and p["queries_per_change"] <= 1,
            f"{p['requests']} requests, {p['changes']} changes")
    elif isinstance(pg, dict) and "skipped" in pg:
        add("aggregates targets", "304 >= 10000 req/s; <= 1 query per change", None, "", None,
            "skipped: " + pg["skipped"])
    if quick:
        for entry in out:
            entry.setdefault("note", "")
            entry["note"] = ("quick run (shorter, smaller); " + entry["note"]).strip("; ")
    return out


def plots(report: dict[str, Any], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    cores = report["meta"]["cpu_count"]
    colors = {"pgsse": "#1f77b4", "baseline": "#d62728"}
    labels = {"pgsse": "pgsse", "baseline": "baseline (broadcaster + sse-starlette)"}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(outdir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # fan-out CPU per delivery
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for side in ("pgsse", "baseline"):
        rows = _fanout(report, side)
        if rows:
            ax.plot([r["clients"] for r in rows], [r["cpu_per_delivery_us"] for r in rows],
                    "o-", color=colors[side], label=labels[side])
    ax.axhline(20, color="gray", ls="--", label="target 20 µs")
    ax.set_xlabel("clients (1 event → N)")
    ax.set_ylabel("server CPU per delivery (µs)")
    ax.set_title(f"Fan-out CPU per delivery ({cores} cores, server on 1)")
    ax.set_ylim(bottom=0)
    ax.legend()
    save(fig, "fanout_cpu.png")

    # fan-out latency
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for side in ("pgsse", "baseline"):
        rows = _fanout(report, side)
        if rows:
            xs = [r["clients"] for r in rows]
            ax.plot(xs, [r["latency"]["p50_ms"] for r in rows], "o-", color=colors[side],
                    label=f"{labels[side]} p50")
            ax.plot(xs, [r["latency"]["p99_ms"] for r in rows], "s--", color=colors[side],
                    label=f"{labels[side]} p99")
    ax.axhline(250, color="gray", ls=":", label="target p99 at 10k: 250 ms")
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("publish → client receipt (ms)")
    ax.set_title("Fan-out latency")
    ax.legend(fontsize=7)
    save(fig, "fanout_latency.png")

    # RSS per idle connection
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for side in ("pgsse", "baseline"):
        rows = [r for r in _idle(report, side) if r.get("rss_per_connection_kib") is not None]
        if rows:
            ax.plot([r["clients"] for r in rows], [r["rss_per_connection_kib"] for r in rows],
                    "o-", color=colors[side], label=labels[side])
    ax.axhline(15, color="gray", ls="--", label="target 15 kB")
    ax.set_xlabel("idle connections")
    ax.set_ylabel("server RSS per connection (KiB)")
    ax.set_title("Memory per idle SSE connection")
    ax.set_ylim(bottom=0)
    ax.legend()
    save(fig, "idle_rss.png")

    # commit→client latency
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names, p50, p99 = [], [], []
    for side in ("pgsse", "baseline"):
        c = _commit(report, side)
        if c:
            names.append(side)
            p50.append(c["latency"]["p50_ms"] or float("nan"))
            p99.append(c["latency"]["p99_ms"] or float("nan"))
    if names:
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99 (missing = not delivered in time)")
        ax.set_xticks(list(xs), names)
        ax.set_yscale("log")
        ax.set_ylabel("commit → client (ms)")
        ax.set_title("Commit → client latency under 200 tx/s")
        ax.legend(fontsize=8)
    save(fig, "commit_latency.png")

    # aggregate req/s
    agg = report.get("scenarios", {}).get("aggregates", {})
    bars: list[tuple[str, float]] = []
    if isinstance(agg, dict):
        for side, cases in (("pgsse", ("304", "cached_200", "uncached_200")),
                            ("baseline", ("uncached_200",))):
            data = agg.get(side, {})
            for case in cases:
                if isinstance(data, dict) and isinstance(data.get(case), dict) and "rps" in data[case]:
                    bars.append((f"{side}\n{case}", data[case]["rps"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if bars:
        ax.bar([b[0] for b in bars], [b[1] for b in bars],
               color=["#1f77b4" if b[0].startswith("pgsse") else "#d62728" for b in bars])
        ax.axhline(10_000, color="gray", ls="--", label="target 304: 10,000 req/s")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "aggregates scenario skipped", ha="center", va="center")
    ax.set_ylabel("requests/s (server on one core)")
    ax.set_title("Aggregate endpoint throughput")
    save(fig, "aggregates_rps.png")

    # writer tps: median over the rounds, per operation and design
    writer = report.get("scenarios", {}).get("writer", {})
    runs = writer.get("runs", {}) if isinstance(writer, dict) else {}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ops = [op for op in ("insert", "update") if isinstance(runs.get(op), dict)]
    if ops:
        designs = list(runs[ops[0]])
        width = 0.8 / max(1, len(designs))
        for i, design in enumerate(designs):
            medians = []
            for op in ops:
                tps = sorted(r["tps"] for r in runs[op].get(design, []) if r.get("tps"))
                medians.append(tps[len(tps) // 2] if tps else 0)
            ax.bar([x + (i - (len(designs) - 1) / 2) * width for x in range(len(ops))], medians,
                   width, label=design)
        ax.set_xticks(list(range(len(ops))), ops)
        ax.legend()
    ax.set_ylabel("pgbench transactions/s (median of rounds)")
    ax.set_title("Writer cost: 8 clients, watched vs unwatched, service running")
    save(fig, "writer_tps.png")
    return made


def table(report: dict[str, Any]) -> str:
    lines = [f"pgsse bench — {report['meta']['cpu_count']} cores, quick={report['meta']['quick']}"]
    lines.append(f"{'scenario':44} {'pgsse':>14} {'baseline':>14}")

    def row(name: str, a: Any, b: Any) -> None:
        fa = "-" if a is None else str(a)
        fb = "-" if b is None else str(b)
        lines.append(f"{name:44} {fa:>14} {fb:>14}")

    for side_rows in [(_idle(report, "pgsse"), _idle(report, "baseline"))]:
        base = {r["clients"]: r for r in side_rows[1]}
        for r in side_rows[0]:
            b = base.get(r["requested"]) or next((x for x in side_rows[1]
                                                  if x["requested"] == r["requested"]), None)
            row(f"idle RSS/conn @{r['requested']} (KiB)", r["rss_per_connection_kib"],
                b["rss_per_connection_kib"] if b else None)
    pf, bf = _fanout(report, "pgsse"), _fanout(report, "baseline")
    bmap = {r["clients"]: r for r in bf}
    for r in pf:
        b = bmap.get(r["clients"]) or min(bf, key=lambda x: abs(x["clients"] - r["clients"]),
                                          default=None)
        row(f"fan-out CPU/delivery @{r['clients']} (µs)", r["cpu_per_delivery_us"],
            b["cpu_per_delivery_us"] if b else None)
        row(f"fan-out p50/p99 @{r['clients']} (ms)",
            f"{r['latency']['p50_ms']}/{r['latency']['p99_ms']}",
            f"{b['latency']['p50_ms']}/{b['latency']['p99_ms']}" if b else None)
    pc, bc = _commit(report, "pgsse"), _commit(report, "baseline")
    if pc:
        row(f"commit→client p50/p99 @{pc['clients']} (ms)",
            f"{pc['latency']['p50_ms']}/{pc['latency']['p99_ms']}",
            f"{bc['latency']['p50_ms']}/{bc['latency']['p99_ms']}" if bc else None)
    agg = report.get("scenarios", {}).get("aggregates", {})
    if isinstance(agg, dict):
        pg, bl = agg.get("pgsse", {}), agg.get("baseline", {})
        for case in ("304", "cached_200", "uncached_200"):
            a = pg.get(case, {}).get("rps") if isinstance(pg, dict) and isinstance(pg.get(case), dict) else None
            b = bl.get(case, {}).get("rps") if isinstance(bl, dict) and isinstance(bl.get(case), dict) else None
            if a is not None or b is not None:
                row(f"aggregate {case} (req/s)", a, b)
        if isinstance(pg, dict) and "skipped" in pg:
            row("aggregates (pgsse)", "skipped", None)
        pp = pg.get("polling") if isinstance(pg, dict) else None
        bp = bl.get("polling") if isinstance(bl, dict) else None
        if pp or bp:
            row("queries per 10k polls (1 change/s)",
                pp.get("queries_per_10k_requests") if pp else None,
                bp.get("queries_per_10k_requests") if bp else None)
    writer = report.get("scenarios", {}).get("writer", {})
    if isinstance(writer, dict):
        for op, per in writer.get("runs", {}).items():
            for design, results in per.items():
                row(f"pgbench {op} {design} c8 (tps per round)",
                    "/".join(str(r.get("tps")) for r in results), None)
        for design, results in writer.get("bulk_ms", {}).items():
            row(f"INSERT ... SELECT 10k rows, {design} (ms per round)",
                "/".join(str(r) for r in results), None)
        for key, spread in writer.get("ratio_vs_unwatched", {}).items():
            if spread:
                row(f"writer ratio {key} (min/median/max)",
                    f"{spread['min']}/{spread['median']}/{spread['max']}", None)
    lines.append("")
    lines.append("targets:")
    for t in report.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[t["pass"]]
        lines.append(f"  [{mark}] {t['target']}: {t['measured']} {t['unit']} (target {t['threshold']})")
    return "\n".join(lines)
