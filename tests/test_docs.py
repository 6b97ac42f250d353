"""The docs cannot drift from the code: both configuration tables list exactly the variables
``Settings.from_env`` reads, with the defaults the code has; the metrics table lists exactly
the metrics ``metrics.py`` declares."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pgsse import metrics
from pgsse.settings import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ROOT / "service" / "settings.py"


def variables_in_code() -> set[str]:
    return set(re.findall(r'take\("([A-Z_]+)"', SETTINGS.read_text()))


def table_rows(path: Path, heading: str) -> dict[str, str]:
    """Variable → default cell of the table under ``heading``."""
    text = path.read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([A-Z_]+)`", cells[0])
        # A plain default is the cell's first word in backticks; prose ("unset → …") is not.
        defaults = re.findall(r"`([^`]*)`", cells[1]) if cells[1].startswith("`") else []
        for i, name in enumerate(names):
            rows[name] = defaults[i] if i < len(defaults) else ""
    return rows


DOCS = [(ROOT / "README.md", "## Configuration"), (ROOT / "docs" / "operations.md", "## Configuration")]


@pytest.mark.parametrize("path,heading", DOCS, ids=["README", "operations"])
def test_configuration_tables_list_every_variable_the_code_reads(path: Path, heading: str) -> None:
    documented = set(table_rows(path, heading))
    code = variables_in_code()
    assert code - documented == set(), f"read by settings.py but not documented in {path.name}"
    assert documented - code == set(), f"documented in {path.name} but not read by settings.py"


def attribute_of(name: str) -> str:
    match = re.search(rf'take\("{name}", "([a-z_]+)"', SETTINGS.read_text())
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("path,heading", DOCS, ids=["README", "operations"])
def test_documented_defaults_are_the_code_defaults(path: Path, heading: str) -> None:
    defaults = Settings()
    checked = 0
    for name, cell in table_rows(path, heading).items():
        if not cell or name in ("DEMO", "LOG_FORMAT", "HOST"):
            continue  # "on for make run", "text for make run", "0.0.0.0 in the image": prose
        try:
            parsed: Any = getattr(Settings.from_env({name: cell}), attribute_of(name))
        except ConfigError:
            continue  # a prose default ("unset", "none")
        assert parsed == getattr(defaults, attribute_of(name)), f"{path.name}: {name} = {cell}"
        checked += 1
    assert checked >= 15, "most defaults are plain values and must be checked"


def test_metrics_table_lists_every_metric() -> None:
    declared = set()
    for collector in metrics.REGISTRY._collector_to_names:  # noqa: SLF001 - the registry's own list
        for sample_name in metrics.REGISTRY._collector_to_names[collector]:  # noqa: SLF001
            if sample_name.endswith(("_created", "_bucket", "_sum", "_count")):
                continue
            declared.add(sample_name)
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(pgsse_[a-z_]+)", text, re.M))
    families = {name.removesuffix("_total") for name in declared}
    documented_families = {name.removesuffix("_total") for name in documented}
    assert families - documented_families == set(), "declared but not documented"
    assert documented_families - families == set(), "documented but not declared"
