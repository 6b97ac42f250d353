"""pgsse: committed PostgreSQL changes streamed to browsers over Server-Sent Events."""

from __future__ import annotations

__version__ = "0.1.0"
