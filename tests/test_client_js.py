"""The browser client (clients/js, npm package ``pgsse``): its node unit tests, the copy the
service serves (no drift, ETag/304, CORS), the version, the wheel's copy, the types, and live
runs of the real client (node) against a real pgsse — restarts, tokens, resets, nginx 502s."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ROOT
from tests.tools import require_tool

JS = ROOT / "clients" / "js"
SRC = JS / "src"
Start = Callable[..., Any]


def node_modules() -> Path:
    """The JS dev dependencies (`make test` installs them); their absence is a failure."""
    require_tool("npm")
    path = JS / "node_modules" / "eventsource-parser"
    if not path.is_dir():
        pytest.fail("clients/js/node_modules is missing: run `make test` (or npm --prefix clients/js ci)")
    return JS / "node_modules"


def test_node_unit_tests() -> None:
    node = require_tool("node")
    node_modules()
    tests = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert len(tests) >= 5, tests
    result = subprocess.run([node, "--test", *tests], cwd=JS, capture_output=True, text=True, timeout=120)
    summary = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.M))
    assert result.returncode == 0 and summary.get("fail") == "0", result.stdout[-6000:] + result.stderr[-2000:]
    assert int(summary["pass"]) >= 45, summary


def test_typescript_declarations_type_check() -> None:
    node = require_tool("node")
    tsc = node_modules() / "typescript" / "bin" / "tsc"
    result = subprocess.run([node, str(tsc), "-p", "test/tsconfig.json"], cwd=JS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # And the checker is really checking: a wrong use of the API is an error.
    bad = JS / "test" / "types-bad.ts"
    config = JS / "test" / "tsconfig.bad.json"
    bad.write_text('import { createClient } from "pgsse";\ncreateClient({ url: 42 });\n')
    config.write_text(json.dumps({"extends": "./tsconfig.json", "files": ["types-bad.ts"]}))
    try:
        result = subprocess.run([node, str(tsc), "-p", str(config)], cwd=JS,
                                capture_output=True, text=True, timeout=120)
    finally:
        bad.unlink()
        config.unlink()
    assert result.returncode != 0 and "types-bad.ts(2," in result.stdout, result.stdout + result.stderr


def test_package_json_version_and_exports() -> None:
    from pgsse import __version__

    package = json.loads((JS / "package.json").read_text())
    assert package["name"] == "pgsse" and package["type"] == "module"
    assert package["version"] == __version__
    assert set(package["exports"]) >= {".", "./tanstack-query", "./react"}
    for entry in ("." , "./tanstack-query", "./react"):
        for kind in ("types", "default"):
            assert (JS / package["exports"][entry][kind]).is_file(), (entry, kind)
    assert not package.get("dependencies"), "no runtime dependencies"
    assert set(package["devDependencies"]) >= {"eventsource-parser", "typescript"}
    assert f'export const VERSION = "{__version__}";' in (SRC / "index.js").read_text()


def source_files() -> list[Path]:
    files = sorted(p for p in SRC.iterdir() if p.name.endswith((".js", ".d.ts")))
    assert {"index.js", "index.d.ts", "tanstack-query.js", "react.js"} <= {p.name for p in files}
    return files


def test_served_client_is_the_source(server: Any) -> None:
    """Every file of clients/js/src is served byte for byte (no drift), with ETag, 304 and CORS."""
    with httpx.Client(base_url=server.url, timeout=5) as http:
        for path in source_files():
            response = http.get(f"/client/{path.name}", headers={"Origin": "http://elsewhere.example"})
            assert response.status_code == 200, path.name
            assert response.content == path.read_bytes(), f"/client/{path.name} drifted from {path}"
            kind = "text/javascript" if path.name.endswith(".js") and not path.name.endswith(".d.ts") \
                else "application/typescript"
            assert response.headers["content-type"].startswith(kind), path.name
            assert response.headers["access-control-allow-origin"] == "*"
            etag = response.headers["etag"]
            assert etag.startswith('W/"')
            again = http.get(f"/client/{path.name}", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            assert http.get(f"/client/{path.name}", headers={"If-None-Match": 'W/"other"'}).status_code == 200
        entry = http.get("/client.js")
        assert entry.status_code == 200 and entry.headers["content-type"].startswith("text/javascript")
        assert entry.headers["access-control-allow-origin"] == "*"
        # The entry point re-exports index.js, so index.js's relative imports resolve under /client/.
        target = re.search(rb'from "\./client/([\w.-]+)"', entry.content)
        assert target and (SRC / target.group(1).decode()).is_file()
        assert http.get("/client.js", headers={"If-None-Match": entry.headers["etag"]}).status_code == 304
        assert http.head("/client/index.js").status_code == 200
        for bad in ("nope.js", "..%2Fpackage.json", "%2E%2E%2F%2E%2E%2Fpyproject.toml", "index.ts",
                    ".hidden.js", "package.json"):
            response = http.get(f"/client/{bad}")
            assert response.status_code == 404, bad
            assert response.json()["error"]["code"] == "not_found"


def test_wheel_ships_the_client(tmp_path: Path) -> None:
    """An installed wheel (no checkout beside it) serves the same bytes from package data."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=180)
    wheel = next(tmp_path.glob("pgsse-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    for path in source_files():
        assert f"pgsse/client/{path.name}" in names, path.name
    probe = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "import pgsse.clientjs as c;"
        "files = c.ClientFiles();"
        "print(json.dumps({'root': str(c.source()), 'file': c.__file__,"
        " 'index': files.get('index.js')[0].decode()}))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["file"].startswith(str(site)), found["file"]
    assert found["root"].startswith(str(site)), found["root"]
    assert found["index"] == (SRC / "index.js").read_text()
