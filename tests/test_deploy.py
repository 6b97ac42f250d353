"""deploy/ checked by each tool's real validator, and real nginx and Prometheus in front of
and behind a real pgsse."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.support import ROOT, free_port, read_sse
from tests.tools import require_tool

DEPLOY = ROOT / "deploy"
Start = Callable[..., Any]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_dockerfile_passes_hadolint() -> None:
    run(require_tool("hadolint"), str(DEPLOY / "Dockerfile"))


def test_compose_file_matches_the_compose_schema() -> None:
    run(require_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
        str(DEPLOY / "docker-compose.yml"))


def test_kubernetes_manifests_validate_strictly() -> None:
    run(require_tool("kubernetes-validate"), "--strict", *map(str, sorted((DEPLOY / "k8s").glob("*.yaml"))))


def test_kubernetes_grace_period_outlasts_the_drain() -> None:
    text = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))  # type: ignore[union-attr]
    drain = int(re.search(r'SHUTDOWN_GRACE_SECONDS\n\s+value: "(\d+)"', text).group(1))  # type: ignore[union-attr]
    pause = int(re.search(r'command: \["sleep", "(\d+)"\]', text).group(1))  # type: ignore[union-attr]
    assert grace > drain + pause


def nginx_config(tmp_path: Path, upstream_port: int, listen_port: int) -> Path:
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "pgsse-upstream.conf").write_text(
        f"upstream pgsse {{ server 127.0.0.1:{upstream_port}; keepalive 8; }}\n")
    site = (DEPLOY / "nginx" / "pgsse.conf").read_text()
    site = site.replace("/etc/nginx/pgsse-upstream.conf", str(tmp_path / "pgsse-upstream.conf"))
    site = site.replace("/var/cache/nginx/pgsse", str(tmp_path / "cache"))
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    (tmp_path / "site.conf").write_text(site)
    main = tmp_path / "nginx.conf"
    # As root, workers would otherwise run as an unprivileged user who cannot reach tmp_path.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n"
        f"  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;\n"
        f"  include {tmp_path}/site.conf;\n}}\n")
    return main


def test_nginx_config_is_valid(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    config = nginx_config(tmp_path, 8000, free_port())
    run(nginx, "-t", "-p", str(tmp_path), "-c", str(config))


def test_prometheus_config_and_rules(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text().replace(
        "/etc/prometheus/rules.yml", str(DEPLOY / "prometheus" / "rules.yml"))
    (tmp_path / "prometheus.yml").write_text(config)
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))
    run(promtool, "test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")


def declared_metrics() -> set[str]:
    text = (ROOT / "service" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r"(Counter|Gauge|Histogram)\(\s*\"(pgsse_[a-z_]+)\"", text):
        names.add(name + "_total" if kind == "Counter" else name)
    return names


def test_grafana_dashboard_queries_only_existing_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "pgsse-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    declared = declared_metrics()
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"pgsse_[a-z_]+", e)}
    assert used and used <= declared, used - declared
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    in_rules = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"pgsse_[a-z_]+", rules)}
    assert in_rules <= declared, in_rules - declared


async def test_real_nginx_streams_sse_unbuffered_and_revalidates_aggregates(
        start_server: Start, conn: asyncpg.Connection, tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.0001"})
    port = free_port()
    config = nginx_config(tmp_path, server.port, port)
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
        received: list[float] = []
        task = asyncio.create_task(read_sse(base + "/events", params={"topic": "via"}, timeout=10,
                                            until=lambda s: len(s.events) >= 1 and not received.append(time.monotonic())))
        await asyncio.sleep(0.5)
        sent = time.monotonic()
        await conn.execute("SELECT realtime.publish('via', 'hello', '{\"through\": \"nginx\"}')")
        stream = await task
        assert stream.status == 200 and stream.events[0].json() == {"through": "nginx"}
        assert received[0] - sent < 2.0, "an unbuffered proxy delivers at once"
        first = httpx.get(base + "/aggregates/orders_by_status")
        assert first.status_code == 200
        etag = first.headers["etag"]
        again = httpx.get(base + "/aggregates/orders_by_status", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag
    finally:
        proc.terminate()
        proc.wait(10)


async def test_real_prometheus_scrapes_pgsse(server: Any, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pgsse\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        result: list[Any] = []
        while time.monotonic() < deadline and not result:
            await asyncio.sleep(0.5)
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                     params={"query": "pgsse_feed_up"}, timeout=2)
                result = response.json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                continue
        assert result and result[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(10)
