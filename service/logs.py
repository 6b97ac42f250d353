"""Logging: stdlib, one JSON object per line with a stable ``event`` key (or text).

uvicorn's loggers go through the same configuration. Secrets never reach a log line:
query strings are logged with ``access_token`` redacted, and no headers are logged.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
_TOKEN_RE = re.compile(r"(access_token=)[^&]*", re.IGNORECASE)


_EVENTS = {"uvicorn.error": "server", "uvicorn.access": "access"}


def redact(text: str) -> str:
    return _TOKEN_RE.sub(r"\1[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or _EVENTS.get(record.name, record.name),
            "message": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in body:
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{key}={value}" for key, value in vars(record).items()
            if key not in _RESERVED and key != "event"
        )
        line = f"{time.strftime('%H:%M:%S')} {record.levelname:<7} {redact(record.getMessage())}"
        return f"{line} {extras}" if extras else line


class DropAbandonedStreams(logging.Filter):
    """A slow client's stream is ended by abandoning its blocked write on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ASGI callable returned without completing")


def config(level: str = "info", fmt: str = "json") -> dict[str, Any]:
    formatter = "pgsse.logs.JsonFormatter" if fmt == "json" else "pgsse.logs.TextFormatter"
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": formatter}},
        "filters": {"abandoned": {"()": "pgsse.logs.DropAbandonedStreams"}},
        "handlers": {"main": {**handler, "filters": ["abandoned"]}},
        "loggers": {
            "pgsse": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            # Access lines come from our request middleware (route, status, request id).
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["main"], "level": "WARNING"},
    }


def setup(level: str = "info", fmt: str = "json") -> None:
    logging.config.dictConfig(config(level, fmt))
