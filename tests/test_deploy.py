"""deploy/ checked by each tool's real validator (hadolint, check-jsonschema, kubernetes-validate,
nginx -t, promtool), nginx's behaviour against a stub upstream, and real nginx and Prometheus
in front of and behind a real pgsse.

A missing tool skips with the reason, or fails under PGSSE_REQUIRE_TOOLS=1 (tests/tools.py).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.support import ROOT, free_port, open_stream
from tests.tools import require_tool

if TYPE_CHECKING:
    import asyncpg

DEPLOY = ROOT / "deploy"
Start = Callable[..., Any]

# The alerts docs/operations.md promises (each must also have a unit test in rules_test.yml).
REQUIRED_ALERTS = {
    "PgsseDown", "PgsseNotReady", "PgsseChangeFeedDown", "PgsseFeedLagging", "PgsseNoSequencer",
    "PgsseSlowClientsDropped", "PgsseDeliveryLatencyHigh", "PgsseNotifyQueueFilling",
    "PgsseAtCapacity",
    # issue 19
    "PgsseSequencerCannotNumber", "PgsseHistoryNotPruned",
}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}{result.stderr}"
    return result


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    run(require_tool("hadolint"), "--failure-threshold", "info", str(DEPLOY / "Dockerfile"))


def test_dockerfile_pins_its_base_runs_unprivileged_and_keeps_the_sql_layout() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.1[1-9][\w.-]*", base) and "latest" not in base, base
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # The runtime stage installs the wheel only: no source copy, no PYTHONPATH.
    runtime = text.split("\nFROM ", 2)[-1]
    assert "pip install" in runtime and ".whl" in runtime
    assert not re.search(r"^COPY (service|sql)\b", runtime, re.M), "source copied over the wheel"
    assert "PYTHONPATH" not in text
    assert "HOST=0.0.0.0" in text


# --- docker compose -----------------------------------------------------------------------

def test_compose_file_matches_the_compose_schema() -> None:
    run(require_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
        str(DEPLOY / "docker-compose.yml"))


def test_compose_runs_migrate_once_before_pgsse_and_outlasts_the_drain() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "pgsse", "nginx", "prometheus", "grafana"} <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    assert services["pgsse"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert int(services["postgres"]["image"].split(":")[1].split(".")[0]) >= 16
    drain = float(services["pgsse"]["environment"]["SHUTDOWN_GRACE_SECONDS"])
    assert float(services["pgsse"]["stop_grace_period"].rstrip("s")) > drain


# --- Kubernetes ---------------------------------------------------------------------------

K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("manifest", K8S_MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_validates_strictly(manifest: Path) -> None:
    run(require_tool("kubernetes-validate"), "--strict", str(manifest))


def test_kubernetes_deployment_probes_drain_and_secrets() -> None:
    kinds = {doc["kind"]: doc for path in K8S_MANIFESTS for doc in load_yaml_documents(path)}
    assert {"Deployment", "PodDisruptionBudget", "Service"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "pgsse")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = container["lifecycle"]["preStop"]
    assert "sleep" not in pre_stop and pre_stop["exec"]["command"][0] == "sleep"
    pause = float(pre_stop["exec"]["command"][1])
    env = {e["name"]: e for e in container["env"]}
    drain = float(env["SHUTDOWN_GRACE_SECONDS"]["value"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    for name in ("DATABASE_URL", "AUTH_SECRET"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["HOST"]["value"] == "0.0.0.0"
    selector = kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels(kinds["Deployment"]).items()
    assert kinds["Service"]["spec"]["selector"].items() <= pod_labels(kinds["Deployment"]).items()


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


# --- nginx --------------------------------------------------------------------------------

def nginx_config(tmp_path: Path, upstream_port: int, listen_port: int) -> Path:
    """deploy/nginx/pgsse.conf under a throw-away main config: our own upstream include on
    127.0.0.1 (``nginx -t`` resolves host names), cache, pid, logs and temp dirs in tmp_path."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "pgsse-upstream.conf").write_text(
        f"upstream pgsse {{ server 127.0.0.1:{upstream_port}; keepalive 8; }}\n")
    site = (DEPLOY / "nginx" / "pgsse.conf").read_text()
    for old, new in [("/etc/nginx/pgsse-upstream.conf", str(tmp_path / "pgsse-upstream.conf")),
                     ("/var/cache/nginx/pgsse", str(tmp_path / "cache")),
                     ("listen 80;", f"listen 127.0.0.1:{listen_port};")]:
        assert old in site, old
        site = site.replace(old, new)
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


def nginx_command(nginx: str, tmp_path: Path, config: Path, *extra: str) -> list[str]:
    # -e: the error log before the config is read (nginx would open /var/log/nginx/error.log).
    return [nginx, "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c", str(config), *extra]


def test_nginx_config_is_valid(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    run(*nginx_command(nginx, tmp_path, nginx_config(tmp_path, 8000, free_port()), "-t"))


def test_nginx_config_streams_sse_and_revalidates_aggregates() -> None:
    """The settings the issue asks for, so an edit that drops one is caught without nginx."""
    text = (DEPLOY / "nginx" / "pgsse.conf").read_text()
    events = re.search(r"location = /events \{(.*?)\n    \}", text, re.S)
    assert events, "a location for /events"
    for directive in ("proxy_buffering off;", "proxy_cache off;", "gzip off;"):
        assert directive in events.group(1), directive
    timeout = re.search(r"proxy_read_timeout (\d+)([smh]);", events.group(1))
    assert timeout and int(timeout.group(1)) * {"s": 1, "m": 60, "h": 3600}[timeout.group(2)] >= 3600
    assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
    aggregates = re.search(r"location /aggregates \{(.*?)\n    \}", text, re.S)
    assert aggregates and "proxy_cache_revalidate on;" in aggregates.group(1)
    assert not re.search(r"^\s*upstream ", text, re.M), "the upstream lives in deploy/nginx/upstream.conf"
    assert re.search(r"upstream pgsse \{", (DEPLOY / "nginx" / "upstream.conf").read_text())


class StubUpstream(http.server.BaseHTTPRequestHandler):
    """Stands in for pgsse: a slow event stream and an aggregate with a weak ETag that answers
    304 to a matching If-None-Match; records the conditional headers it receives."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None]] = []
    etag = 'W/"v1"'

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("If-None-Match")))
        if self.path.startswith("/events"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(2):
                frame = f"id: {i}\nevent: tick\ndata: {{}}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                self.wfile.flush()
                time.sleep(1.0)
            self.wfile.write(b"0\r\n\r\n")
            return
        private = self.headers.get("Authorization") is not None
        cache = "private, max-age=5" if private else "public, max-age=1"
        if self.headers.get("If-None-Match") == self.etag:
            self.send_response(304)
            self.send_header("ETag", self.etag)
            self.send_header("Cache-Control", cache)
            self.end_headers()
            return
        body = b'{"data": [], "meta": {"position": 1}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", self.etag)
        self.send_header("Cache-Control", cache)
        self.send_header("Vary", "Accept-Encoding")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client (nginx) closing a stream early is expected here


@pytest.fixture
def stub_behind_nginx(tmp_path: Path) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    nginx = require_tool("nginx")
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (StubUpstream,), {"seen": seen})
    upstream = QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    config = nginx_config(tmp_path, upstream.server_address[1], port)
    proc = subprocess.Popen(nginx_command(nginx, tmp_path, config),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(base + "/aggregates/warmup", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield base, seen
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.shutdown()
        upstream.server_close()


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_nginx_streams_events_unbuffered(stub_behind_nginx: tuple[str, list[Any]]) -> None:
    base, _ = stub_behind_nginx
    with urllib.request.urlopen(base + "/events?topic=a", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert "gzip" not in response.headers.get("Content-Encoding", "")
        started = time.monotonic()
        first = response.readline()
        # The stub sleeps 1 s after the first frame: a buffering proxy would hold it back.
        assert first == b"id: 0\n" and time.monotonic() - started < 0.8


def test_nginx_caches_aggregates_and_revalidates_with_if_none_match(
        stub_behind_nginx: tuple[str, list[tuple[str, str | None]]]) -> None:
    base, seen = stub_behind_nginx
    url = base + "/aggregates/orders?page=1"
    status, headers, _ = fetch(url)
    assert status == 200 and headers["ETag"] == 'W/"v1"' and headers["X-Cache-Status"] == "MISS"
    status, headers, body = fetch(url, {"If-None-Match": 'W/"v1"'})
    assert status == 304 and body == b"" and headers["X-Cache-Status"] == "HIT"
    # Past max-age=1 (nginx counts whole seconds), a request revalidates upstream with the ETag.
    deadline = time.monotonic() + 5
    while (url.removeprefix(base), 'W/"v1"') not in seen:
        assert time.monotonic() < deadline, seen
        time.sleep(0.25)
        assert fetch(url)[0] == 200
    assert [path for path, _ in seen].count(url.removeprefix(base)) == 2, "one full fetch, one revalidation"
    # Callers with credentials bypass the shared cache; their If-None-Match reaches pgsse.
    status, headers, _ = fetch(url + "&x=1", {"Authorization": "Bearer t", "If-None-Match": 'W/"v1"'})
    assert status == 304 and "X-Cache-Status" not in headers
    assert ("/aggregates/orders?page=1&x=1", 'W/"v1"') in seen
    assert fetch(base + "/metrics")[0] == 404


# --- Prometheus ---------------------------------------------------------------------------

def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert "/etc/prometheus/rules.yml" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/rules.yml", str(DEPLOY / "prometheus" / "rules.yml")))
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))


def test_prometheus_rules_are_valid() -> None:
    run(require_tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))


def test_prometheus_rules_unit_tests_pass() -> None:
    run(require_tool("promtool"), "test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")


def test_every_required_alert_exists_and_is_unit_tested() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert REQUIRED_ALERTS <= alerts, REQUIRED_ALERTS - alerts
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    tested = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", [])
              if c.get("exp_alerts")}
    assert alerts <= tested, f"alerts never seen firing in rules_test.yml: {alerts - tested}"
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert all(f"`{name}`" in operations for name in alerts), "docs/operations.md lists every alert"


# --- Grafana and metric names -------------------------------------------------------------

def declared_metrics() -> set[str]:
    """Metric names service/metrics.py declares, as exported (counters gain ``_total``)."""
    text = (ROOT / "service" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"(pgsse_\w+)\"", text):
        names.add(name + "_total" if kind == "Counter" and not name.endswith("_total") else name)
    assert names, "no metric declarations found in service/metrics.py"
    return names


def used_metrics(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bpgsse_\w+", text)}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "pgsse-dashboard.json").read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard["panels"]))


def test_grafana_dashboard_queries_only_existing_metrics() -> None:
    exprs = dashboard_exprs()
    used = set().union(*map(used_metrics, exprs))
    declared = declared_metrics()
    assert used, "the dashboard queries pgsse metrics"
    assert used <= declared, f"not in service/metrics.py: {sorted(used - declared)}"
    in_rules = used_metrics((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert in_rules <= declared, f"rules use metrics not in service/metrics.py: {sorted(in_rules - declared)}"


def test_grafana_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    exprs = [re.sub(r"\$__(rate_interval|range|interval)", "5m", e) for e in dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    run(promtool, "check", "rules", str(tmp_path / "dashboard_rules.yml"))


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    dashboard = json.loads((DEPLOY / "grafana" / "pgsse-dashboard.json").read_text())
    used_uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used_uids and used_uids <= uids
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pgsse.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = (DEPLOY / "docker-compose.yml").read_text()
    assert f"./grafana/pgsse-dashboard.json:{path}/" in compose


# --- real nginx and Prometheus with a real pgsse (database fixtures from conftest) ---------

async def test_real_nginx_streams_sse_unbuffered_and_revalidates_aggregates(
        start_server: Start, conn: asyncpg.Connection, tmp_path: Path) -> None:
    import httpx

    nginx = require_tool("nginx")
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.0001"})
    port = free_port()
    config = nginx_config(tmp_path, server.port, port)
    proc = subprocess.Popen(nginx_command(nginx, tmp_path, config),
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
        # Open through nginx (its retry: got through): what is published now is delivered.
        task = await open_stream(base + "/events", params={"topic": "via"}, timeout=10,
                                 until=lambda s: len(s.events) >= 1 and not received.append(time.monotonic()))
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
    import httpx

    prometheus = require_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {DEPLOY / 'prometheus' / 'rules.yml'}\n"
        "scrape_configs:\n  - job_name: pgsse\n"
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
        # The rules load and evaluate against the real series without errors.
        groups = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=2).json()["data"]["groups"]
        assert {r["name"] for g in groups for r in g["rules"]} >= REQUIRED_ALERTS
        assert all(r.get("health") != "err" for g in groups for r in g["rules"]), groups
    finally:
        proc.terminate()
        proc.wait(10)
