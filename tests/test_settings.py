"""``Settings.from_env`` in-process: every variable parses, every bad one is named in one
``ConfigError``, durations, defaults (no server, no database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pgsse.settings import ConfigError, Settings, parse_duration


def test_defaults_without_any_variable() -> None:
    settings = Settings.from_env(env={})
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.heartbeat_seconds == 15.0
    assert settings.history_retention_seconds == 24 * 3600
    assert settings.auth_secret == () and not settings.auth_enabled
    assert settings.demo is False and settings.log_format == "json"
    assert settings.database_url is None and settings.aggregates_dir is None


def test_every_variable_parses(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": "postgresql://u@h/db", "HOST": "0.0.0.0", "PORT": "9000",
        "AUTH_SECRET": "k1, k2", "AUTH_AUDIENCE": "dash", "AUTH_ISSUER": "shop",
        "CORS_ORIGINS": "https://a.example, https://b.example,", "FORWARDED_ALLOW_IPS": " 10.0.0.1 ",
        "HEARTBEAT_SECONDS": "500ms", "STREAM_MAX_SECONDS": "2m", "HISTORY_RETENTION": "7d",
        "AGGREGATES_DIR": str(tmp_path), "DEMO": "yes", "DEMO_RATE": "0.5", "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "Text", "MAX_EVENT_BYTES": "2048", "CLIENT_BUFFER_BYTES": "8192",
        "MAX_CONNECTIONS": "10", "MAX_CONNECTIONS_PER_CLIENT": "2",
        "AGGREGATE_RATE_PER_SECOND": "7.5", "AGGREGATE_CACHE_BYTES": "0", "WAKEUP": "poll",
        "POLL_INTERVAL": "10ms", "SHUTDOWN_GRACE_SECONDS": "3", "RETRY_MS": "1500",
        "REPLAY_MEMORY_BYTES": "0", "READY_MAX_LAG": "1.5s", "SLOW_CLIENT_SECONDS": "1h",
        "HEADER_TIMEOUT": "4", "DATA_DIR": str(tmp_path / "data"),
    }
    s = Settings.from_env(env=env)
    assert (s.database_url, s.host, s.port) == ("postgresql://u@h/db", "0.0.0.0", 9000)
    assert s.auth_secret == ("k1", "k2") and s.auth_enabled
    assert (s.auth_audience, s.auth_issuer) == ("dash", "shop")
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.forwarded_allow_ips == "10.0.0.1"
    assert s.heartbeat_seconds == 0.5 and s.stream_max_seconds == 120.0
    assert s.history_retention_seconds == 7 * 86400
    assert s.aggregates_dir == tmp_path.resolve()
    assert s.demo is True and s.demo_rate == 0.5
    assert (s.log_level, s.log_format) == ("debug", "text")
    assert (s.max_event_bytes, s.client_buffer_bytes) == (2048, 8192)
    assert (s.max_connections, s.max_connections_per_client) == (10, 2)
    assert (s.aggregate_rate_per_second, s.aggregate_cache_bytes) == (7.5, 0)
    assert s.wakeup == "poll" and s.poll_interval_seconds == pytest.approx(0.01)
    assert (s.shutdown_grace_seconds, s.retry_ms, s.replay_memory_bytes) == (3.0, 1500, 0)
    assert s.ready_max_lag_seconds == 1.5 and s.slow_client_seconds == 3600.0
    assert s.header_timeout_seconds == 4.0 and s.data_dir == (tmp_path / "data").resolve()


def test_every_bad_variable_is_named_in_one_error(tmp_path: Path) -> None:
    bad = {
        "PORT": "abc", "AUTH_SECRET": "", "HEARTBEAT_SECONDS": "-1",
        "HISTORY_RETENTION": "forever", "LOG_FORMAT": "xml", "LOG_LEVEL": "loud",
        "DEMO": "maybe", "DEMO_RATE": "0", "MAX_EVENT_BYTES": "10", "WAKEUP": "sometimes",
        "RETRY_MS": "99", "AGGREGATES_DIR": str(tmp_path / "missing"),
        "STREAM_MAX_SECONDS": "0s", "AGGREGATE_RATE_PER_SECOND": "nan",
    }
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env={**bad, "HOST": "0.0.0.0", "MAX_CONNECTIONS": "5"})
    error = caught.value
    assert set(error.problems) == set(bad), "exactly the bad ones, every one of them"
    message = str(error)
    assert "\n" not in message
    for name in bad:
        assert f"{name}:" in message
    assert "between 100 and 600000" in error.problems["RETRY_MS"]
    assert "30s, 5m, 24h or 7d" in error.problems["HISTORY_RETENTION"]
    assert "json, text" in error.problems["LOG_FORMAT"]
    assert "missing" in error.problems["AGGREGATES_DIR"]


@pytest.mark.parametrize("value", ["", " ", ",", "a,,b", "a, "])
def test_an_empty_auth_secret_or_key_is_an_error(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env={"AUTH_SECRET": value})
    assert list(caught.value.problems) == ["AUTH_SECRET"]


@pytest.mark.parametrize("text,seconds", [
    ("30", 30.0), ("1.5", 1.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0),
    ("24h", 86400.0), ("7d", 604800.0), (" 2 m ", 120.0), ("0.5h", 1800.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "forever", "5 minutes", "-1s", "1w", "1e3", "s", "5M"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("name", ["HEARTBEAT_SECONDS", "HISTORY_RETENTION", "POLL_INTERVAL"])
def test_zero_durations_are_refused_where_they_make_no_sense(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env={name: "0"})
    assert caught.value.problems == {name: "must be greater than zero"}


@pytest.mark.parametrize("port,ok", [("0", True), ("65535", True), ("65536", False), ("-1", False),
                                     ("80.5", False)])
def test_port_range(port: str, ok: bool) -> None:
    if ok:
        assert Settings.from_env(env={"PORT": port}).port == int(port)
    else:
        with pytest.raises(ConfigError, match="PORT"):
            Settings.from_env(env={"PORT": port})


@pytest.mark.parametrize("text,value", [("1", True), ("on", True), ("TRUE", True), ("0", False),
                                        ("off", False), ("", False)])
def test_booleans(text: str, value: bool) -> None:
    assert Settings.from_env(env={"DEMO": text}).demo is value


def test_blank_optional_values_mean_unset_and_settings_are_frozen() -> None:
    s = Settings.from_env(env={"DATABASE_URL": " ", "AUTH_AUDIENCE": "", "AGGREGATES_DIR": "",
                               "HOST": ""})
    assert s.database_url is None and s.auth_audience is None and s.aggregates_dir is None
    assert s.host == "127.0.0.1"
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_overrides_apply_after_parsing_and_env_defaults_to_os_environ(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env(env={"PORT": "9000"}, port=1234).port == 1234
    monkeypatch.setenv("PORT", "9100")
    assert Settings.from_env().port == 9100
    assert Settings.from_env(env={}).port == 8000, "an explicit env ignores os.environ"
