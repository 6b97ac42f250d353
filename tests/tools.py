"""External tools a test needs: skip with the reason, or fail when PGSSE_REQUIRE_TOOLS=1."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """The absolute path of ``name`` (also looked up beside this Python, for pip-installed
    binaries); when missing, skip — or fail under ``PGSSE_REQUIRE_TOOLS=1`` (set by CI)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = f"{name} is not installed (.ci/run installs it)"
    if os.environ.get("PGSSE_REQUIRE_TOOLS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
