"""``pgsse.logs`` in-process: one JSON object per line with a stable ``event`` key, tokens
redacted, the text format, and the logging configuration."""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys

import pytest
from pgsse.logs import DropAbandonedStreams, JsonFormatter, TextFormatter, config, redact

SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.SIGNATURE"


def record(message: str = "hello %s", args: tuple[object, ...] = ("world",),
           name: str = "pgsse.feed", level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_have_the_stable_keys_and_the_extras() -> None:
    line = JsonFormatter().format(record(event="feed_lost", cursor=42, error="boom"))
    assert "\n" not in line
    body = json.loads(line)
    assert body["event"] == "feed_lost" and body["level"] == "info"
    assert body["logger"] == "pgsse.feed" and body["message"] == "hello world"
    assert body["cursor"] == 42 and body["error"] == "boom"
    assert body["ts"].endswith("Z") and "T" in body["ts"]
    assert "args" not in body and "msg" not in body and "pathname" not in body


def test_every_line_has_an_event_even_without_one_given() -> None:
    assert json.loads(JsonFormatter().format(record(name="uvicorn.error")))["event"] == "server"
    assert json.loads(JsonFormatter().format(record(name="pgsse.app")))["event"] == "pgsse.app"


def test_a_multi_line_message_and_a_traceback_stay_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        rec = record("two\nlines", (), exc_info=None)
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    body = json.loads(line)
    assert body["message"] == "two\nlines" and "ValueError: bad" in body["exc"]


def test_values_json_cannot_encode_are_written_as_text() -> None:
    body = json.loads(JsonFormatter().format(record(event="x", when=object(), data=b"raw")))
    assert body["when"].startswith("<object") and body["data"] == "b'raw'"


@pytest.mark.parametrize("text", [
    f"GET /events?access_token={SECRET}",
    f"GET /events?topic=a&ACCESS_TOKEN={SECRET}&x=1",
    f"query Access_Token={SECRET}",
])
def test_tokens_in_messages_are_redacted(text: str) -> None:
    assert "SIGNATURE" not in redact(text) and "[redacted]" in redact(text)
    line = JsonFormatter().format(record("%s", (text,)))
    assert "SIGNATURE" not in line
    assert "SIGNATURE" not in TextFormatter().format(record("%s", (text,)))


def test_redaction_stops_at_the_next_parameter() -> None:
    assert redact("access_token=abc&topic=x") == "access_token=[redacted]&topic=x"


def test_the_text_format_is_one_readable_line() -> None:
    line = TextFormatter().format(record("change feed lost", (), level=logging.WARNING,
                                         event="feed_lost", cursor=7))
    assert "\n" not in line
    assert "WARNING" in line and "change feed lost" in line and "cursor=7" in line
    assert "event=" not in line


def test_abandoned_stream_noise_is_dropped_and_nothing_else() -> None:
    drop = DropAbandonedStreams()
    assert not drop.filter(record("ASGI callable returned without completing response.", ()))
    assert drop.filter(record("ASGI callable failed", ()))


def test_the_configuration_routes_pgsse_and_uvicorn_through_one_formatter() -> None:
    json_config = config("debug", "json")
    assert json_config["formatters"]["main"]["()"] == "pgsse.logs.JsonFormatter"
    assert config("info", "text")["formatters"]["main"]["()"] == "pgsse.logs.TextFormatter"
    loggers = json_config["loggers"]
    assert loggers["pgsse"]["level"] == "DEBUG" and loggers["uvicorn"]["level"] == "DEBUG"
    assert loggers["uvicorn.access"]["handlers"] == [], "access lines come from our middleware"
    assert json_config["handlers"]["main"]["filters"] == ["abandoned"]


def test_the_configured_handler_writes_json_lines() -> None:
    # Built from what ``config`` names, on a private logger: dictConfig itself would reset
    # every handler of the test session.
    cfg = config("info", "json")
    module, _, name = cfg["formatters"]["main"]["()"].rpartition(".")
    formatter = getattr(importlib.import_module(module), name)()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(DropAbandonedStreams())
    log = logging.getLogger("pgsse_logs_test.feed")
    log.addHandler(handler)
    log.setLevel(cfg["loggers"]["pgsse"]["level"])
    log.propagate = False
    try:
        log.info("change feed lost", extra={"event": "feed_lost", "cursor": 3})
        log.debug("not at info level")
        log.error("ASGI callable returned without completing response.")
        log.info(f"GET /x?access_token={SECRET}")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "feed_lost" and first["cursor"] == 3
    assert "SIGNATURE" not in lines[1] and second["event"] == "pgsse_logs_test.feed"
