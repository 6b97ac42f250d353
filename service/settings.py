"""Configuration: one frozen ``Settings`` built from environment variables.

Every variable is parsed up front and every bad one is reported in a single
``ConfigError`` so an operator fixes them all in one go.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The SQL ships inside the package (``pgsse.sql``), in a wheel and in a checkout alike.
SQL_DIR = Path(str(resources.files("pgsse.sql")))

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """Raised at start-up when one or more environment variables are invalid."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        lines = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items()))
        super().__init__(f"invalid configuration: {lines}")


def parse_duration(text: str) -> float:
    """``<n>ms|s|m|h|d`` (a bare number means seconds) → seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like 30s, 5m, 24h or 7d, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _secret_list(text: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in text.split(","))
    if not keys or any(not key for key in keys):
        raise ValueError("must be one or more non-empty comma-separated keys")
    return keys


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    auth_secret: tuple[str, ...] = ()
    auth_audience: str | None = None
    auth_issuer: str | None = None
    cors_origins: tuple[str, ...] = ()
    forwarded_allow_ips: str = "127.0.0.1"
    heartbeat_seconds: float = 15.0
    stream_max_seconds: float = 3600.0
    history_retention_seconds: float = 86400.0
    aggregates_dir: Path | None = None
    demo: bool = False
    demo_rate: float = 5.0
    log_level: str = "info"
    log_format: str = "json"
    max_event_bytes: int = 256 * 1024
    client_buffer_bytes: int = 64 * 1024
    max_connections: int = 15000
    max_connections_per_client: int = 64
    aggregate_rate_per_second: float = 50.0
    aggregate_cache_bytes: int = 64 * 1024 * 1024
    wakeup: str = "auto"
    poll_interval_seconds: float = 0.005
    shutdown_grace_seconds: float = 10.0
    retry_ms: int = 2000
    replay_memory_bytes: int = 32 << 20
    ready_max_lag_seconds: float = 5.0
    slow_client_seconds: float = 30.0
    header_timeout_seconds: float = 10.0
    workers: int = 1
    data_dir: Path = field(default_factory=lambda: Path.cwd() / ".data")
    # issue 25: the Mercure hub
    mercure: bool = False
    mercure_anonymous: bool = False
    mercure_publisher_jwt_key: str | None = None
    mercure_subscriber_jwt_key: str | None = None
    mercure_audience: tuple[str, ...] = ()
    mercure_issuer: tuple[str, ...] = ()
    # issue 21: identity providers (JWKS) and grants from claims
    auth_jwks_url: tuple[str, ...] = ()
    auth_jwks_ttl_seconds: float = 600.0
    auth_jwks_min_interval_seconds: float = 30.0
    auth_algorithms: tuple[str, ...] = ()
    auth_topics_claim: str = "topics"
    auth_grants: tuple[str, ...] = ()
    # issue 20: exports free their slot, CSV safe to open, supervisor liveness
    export_csv_safe: bool = True
    export_idle_seconds: float = 60.0
    export_max_concurrent: int = 4
    export_max_per_client: int = 2
    worker_timeout_seconds: float = 10.0
    # issue 20: aggregates get a pool of their own, a bounded wait for it, a statement timeout
    aggregate_pool_size: int = 8
    aggregate_pool_wait_seconds: float = 5.0
    aggregate_timeout_seconds: float = 10.0
    # issue 22: read replicas (a hot standby for feed, history and aggregates), freshness
    read_database_url: str | None = None
    read_poll_interval_seconds: float = 0.02
    min_position_wait_seconds: float = 2.0

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_secret or self.auth_jwks_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); raise one ``ConfigError``."""
        source = os.environ if env is None else env
        problems: dict[str, str] = {}
        values: dict[str, Any] = {}

        def take(name: str, attr: str, parse: Callable[[str], Any]) -> None:
            raw = source.get(name)
            if raw is None:
                return
            try:
                values[attr] = parse(raw)
            except ValueError as exc:
                problems[name] = str(exc) or "invalid value"

        def optional_str(text: str) -> str | None:
            return text.strip() or None

        take("DATABASE_URL", "database_url", optional_str)
        take("HOST", "host", lambda t: t.strip() or "127.0.0.1")
        take("PORT", "port", _int_range(0, 65535))
        take("AUTH_SECRET", "auth_secret", _secret_list)
        take("AUTH_AUDIENCE", "auth_audience", optional_str)
        take("AUTH_ISSUER", "auth_issuer", optional_str)
        take("CORS_ORIGINS", "cors_origins", _csv)
        take("FORWARDED_ALLOW_IPS", "forwarded_allow_ips", lambda t: t.strip())
        take("HEARTBEAT_SECONDS", "heartbeat_seconds", _positive_duration)
        take("STREAM_MAX_SECONDS", "stream_max_seconds", _positive_duration)
        take("HISTORY_RETENTION", "history_retention_seconds", _positive_duration)
        take("AGGREGATES_DIR", "aggregates_dir", _existing_dir)
        take("DEMO", "demo", _bool)
        take("DEMO_RATE", "demo_rate", _positive_float)
        take("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"))
        take("LOG_FORMAT", "log_format", _choice("json", "text"))
        take("MAX_EVENT_BYTES", "max_event_bytes", _int_range(1024, 64 * 1024 * 1024))
        take("CLIENT_BUFFER_BYTES", "client_buffer_bytes", _int_range(4096, 1 << 30))
        take("MAX_CONNECTIONS", "max_connections", _int_range(1, 1_000_000))
        take("MAX_CONNECTIONS_PER_CLIENT", "max_connections_per_client", _int_range(1, 1_000_000))
        take("AGGREGATE_RATE_PER_SECOND", "aggregate_rate_per_second", _positive_float)
        take("AGGREGATE_CACHE_BYTES", "aggregate_cache_bytes", _int_range(0, 1 << 40))
        take("WAKEUP", "wakeup", _choice("auto", "poll", "notify"))
        take("POLL_INTERVAL", "poll_interval_seconds", _positive_duration)
        take("SHUTDOWN_GRACE_SECONDS", "shutdown_grace_seconds", _positive_duration)
        take("RETRY_MS", "retry_ms", _int_range(100, 600_000))
        take("REPLAY_MEMORY_BYTES", "replay_memory_bytes", _int_range(0, 1 << 34))
        take("READY_MAX_LAG", "ready_max_lag_seconds", _positive_duration)
        take("SLOW_CLIENT_SECONDS", "slow_client_seconds", _positive_duration)
        take("HEADER_TIMEOUT", "header_timeout_seconds", _positive_duration)
        take("WORKERS", "workers", _workers)
        take("DATA_DIR", "data_dir", lambda t: Path(t).expanduser().resolve())
        # issue 25: the Mercure hub
        take("MERCURE", "mercure", _bool)
        take("MERCURE_ANONYMOUS", "mercure_anonymous", _bool)
        take("MERCURE_PUBLISHER_JWT_KEY", "mercure_publisher_jwt_key", _nonempty)
        take("MERCURE_SUBSCRIBER_JWT_KEY", "mercure_subscriber_jwt_key", _nonempty)
        take("MERCURE_AUDIENCE", "mercure_audience", _csv)
        take("MERCURE_ISSUER", "mercure_issuer", _csv)
        # issue 21: identity providers (JWKS) and grants from claims
        take("AUTH_JWKS_URL", "auth_jwks_url", _jwks_urls)
        take("AUTH_JWKS_TTL", "auth_jwks_ttl_seconds", _positive_duration)
        take("AUTH_JWKS_MIN_INTERVAL", "auth_jwks_min_interval_seconds", _positive_duration)
        take("AUTH_ALGORITHMS", "auth_algorithms", _algorithms)
        take("AUTH_TOPICS_CLAIM", "auth_topics_claim", _claim_path)
        take("AUTH_GRANTS", "auth_grants", _grant_templates)
        # issue 20: exports free their slot, CSV safe to open, supervisor liveness
        take("EXPORT_CSV_SAFE", "export_csv_safe", _bool)
        take("EXPORT_IDLE_SECONDS", "export_idle_seconds", _positive_duration)
        take("EXPORT_MAX_CONCURRENT", "export_max_concurrent", _int_range(1, 10_000))
        take("EXPORT_MAX_PER_CLIENT", "export_max_per_client", _int_range(1, 10_000))
        take("WORKER_TIMEOUT", "worker_timeout_seconds", _positive_duration)
        # issue 20: aggregate pool, its wait bound, the default statement timeout
        take("AGGREGATE_POOL_SIZE", "aggregate_pool_size", _int_range(1, 1000))
        take("AGGREGATE_POOL_WAIT", "aggregate_pool_wait_seconds", _positive_duration)
        take("AGGREGATE_TIMEOUT", "aggregate_timeout_seconds", _positive_duration)
        # issue 22: read replicas, freshness
        take("READ_DATABASE_URL", "read_database_url", optional_str)
        take("READ_POLL_INTERVAL", "read_poll_interval_seconds", _positive_duration)
        take("MIN_POSITION_WAIT", "min_position_wait_seconds", _positive_duration)
        if problems:
            raise ConfigError(problems)
        values.update(overrides)
        return cls(**values)


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be greater than zero")
    return value


def _workers(text: str) -> int:
    """``auto`` = the cores this process may use: its CPU affinity (a cpuset), capped by a
    cgroup CPU quota (``docker --cpus``, a Kubernetes CPU limit); else a count."""
    if text.strip().lower() == "auto":
        return usable_cores()
    return _int_range(1, 256)(text)


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity alone
    return max(1, cores)


def _existing_dir(text: str) -> Path | None:
    if not text.strip():
        return None
    path = Path(text).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path


# issue 21: identity providers (JWKS) and grants from claims
ALGORITHMS = ("HS256", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "EdDSA")


def _jwks_urls(text: str) -> tuple[str, ...]:
    """``https://`` URLs, or ``http://`` to a loopback address (a test, a sidecar)."""
    import ipaddress
    from urllib.parse import urlsplit

    urls = _csv(text)
    if not urls:
        raise ValueError("expected one or more comma-separated JWKS URLs")
    for url in urls:
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{url!r} is not a URL") from exc
        if parts.scheme == "https" and host:
            continue
        if parts.scheme == "http" and host:
            try:
                if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                    continue
            except ValueError:
                pass
            raise ValueError(f"{url!r}: http:// is allowed only to a loopback address; use https://")
        raise ValueError(f"{url!r} is not an https:// URL")
    return urls


def _algorithms(text: str) -> tuple[str, ...]:
    names = _csv(text)
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown or not names:
        raise ValueError(f"unsupported algorithm {unknown[0] if unknown else ''!r}; "
                         f"choose from {', '.join(ALGORITHMS)}")
    return names


def _claim_path(text: str) -> str:
    if not text.strip():
        raise ValueError("must name a claim")
    return text.strip()


def _grant_templates(text: str) -> tuple[str, ...]:
    """Topics with ``{claim.path}`` placeholders; each must make a valid topic when filled."""
    from .topics import is_valid

    templates = _csv(text)
    for template in templates:
        filled = re.sub(r"\{[^{}]+\}", "x", template)
        if "{" in filled or "}" in filled or not is_valid(filled):
            raise ValueError(f"{template!r} is not a topic with {{claim}} placeholders")
    return templates
