"""``pgsse.Client``: a Python subscriber with resume, for workers, bots, tests and the CLI.

    async for event in pgsse.Client("http://127.0.0.1:8000", ["orders"], token=get_token):
        print(event.id, event.type, event.topic, event.data)

Guarantees, the same as a browser's client gets:

- **Exactly once, in order, across reconnects.** Each connection asks ``/events`` with
  ``Last-Event-ID`` = the id of the last event yielded (or ``last_event_id=``); the service
  replays what followed it. An id at or below the last one is never yielded again.
- **Backoff with jitter.** A stream that ends (``STREAM_MAX_SECONDS``, a draining service)
  is resumed after the service's ``retry:``; failures (refused, reset, 5xx, 429 with its
  ``Retry-After``) back off exponentially from it up to ``max_backoff``, jittered.
- **``reset``** is yielded as an event of type ``reset`` (``data["reason"]``): the state
  built from earlier events must be fetched again. Delivery goes on from its id.
- **Tokens.** ``token`` is a string or a callable (sync or async) returning one; a callable
  is called for every connection, so an ``auth_expired`` (the stream ends, and is resumed)
  or a 401 gets a fresh token. Three 401s in a row, a 401 without a callable to refresh,
  and every other 4xx (400, 403, 404) raise ``ClientError``: retrying would not help.

Every connection uses ``envelope=1``, so each event carries its topic (``Event.topic``):
the topic of the change, ``aggregates/<name>`` for invalidations, ``None`` for ``reset``.
``aggregate.invalidated`` events have no id (``Event.id`` is ``None``). HTTP is httpx, the
SSE framing httpx-sse.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource

from .topics import is_valid

__all__ = ["Client", "ClientError", "Event", "TokenSource"]

TokenSource = str | Callable[[], str | Awaitable[str]] | None
DEFAULT_RETRY_MS = 2000
MAX_UNAUTHORIZED = 3


@dataclass(frozen=True, slots=True)
class Event:
    """One event: ``id`` is its position (``None`` for an aggregate invalidation)."""

    id: int | None
    type: str
    topic: str | None
    data: Any


class ClientError(Exception):
    """The service refused the stream in a way a retry would not fix (4xx)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class _Retry(Exception):
    """This connection is over: come back after ``delay`` seconds (None: backoff)."""

    def __init__(self, delay: float | None = None, fresh_token: bool = False) -> None:
        self.delay = delay
        self.fresh_token = fresh_token


class Client:
    def __init__(self, url: str, topics: str | Iterable[str], *, token: TokenSource = None,
                 last_event_id: int | None = None, max_backoff: float = 30.0,
                 read_timeout: float = 60.0, http: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self.topics = (topics,) if isinstance(topics, str) else tuple(topics)
        if not self.topics or not all(isinstance(t, str) and is_valid(t) for t in self.topics):
            raise ValueError(f"invalid topics {self.topics!r}: one or more /-separated "
                             "non-empty segments of [A-Za-z0-9_.:@%-]")
        if last_event_id is not None and not 0 <= last_event_id < 2**63:
            raise ValueError("last_event_id is a position from 0 to 2^63-1")
        self.token = token
        self.last_event_id = last_event_id
        self.max_backoff = max_backoff
        self.read_timeout = read_timeout
        self.retry_ms = DEFAULT_RETRY_MS
        self.connections = 0  # how many streams were opened (a figure for tests and logs)
        self._http = http
        self._iterator: AsyncGenerator[Event, None] | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    async def aclose(self) -> None:
        """Close the stream now (leaving ``async for`` early leaves it to the collector)."""
        if self._iterator is not None:
            await self._iterator.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _events(self) -> AsyncGenerator[Event, None]:
        timeout = httpx.Timeout(10.0, read=self.read_timeout)
        async with (httpx.AsyncClient(timeout=timeout) if self._http is None
                    else _borrowed(self._http)) as http:
            failures = 0
            unauthorized = 0
            while True:
                try:
                    async for event in self._stream(http):
                        failures = unauthorized = 0
                        yield event
                    delay: float | None = self.retry_ms / 1000  # ended: the server's retry:
                except _Retry as retry:
                    delay = retry.delay
                    if retry.fresh_token:
                        unauthorized += 1
                        if unauthorized >= MAX_UNAUTHORIZED:
                            raise ClientError(401, "unauthorized",
                                              "the service refused every fresh token") from None
                        delay = 0.0 if unauthorized == 1 else None
                    else:
                        unauthorized = 0
                except (httpx.RequestError, ValueError):  # JSONDecodeError is one
                    delay = None  # refused, reset, timed out, a broken frame: back off
                if delay is None:
                    failures += 1
                    ceiling = min(self.max_backoff, self.retry_ms / 1000 * 2 ** (failures - 1))
                    delay = random.uniform(min(ceiling, self.retry_ms / 1000) / 2, ceiling)
                await asyncio.sleep(delay)

    async def _stream(self, http: httpx.AsyncClient) -> AsyncIterator[Event]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        token = await self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        params = httpx.QueryParams({"topic": list(self.topics), "envelope": "1"})
        async with http.stream("GET", self.url + "/events", params=params,
                               headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                self._refuse(response)
            self.connections += 1
            previous_id = ""
            async for sse in EventSource(response).aiter_sse():
                if sse.retry is not None:
                    self.retry_ms = sse.retry
                if not sse.data:
                    continue  # retry: alone
                # httpx-sse keeps the last id for frames without one (as the SSE spec's
                # lastEventId does); positions strictly increase, so a repeat means "no id".
                event_id = int(sse.id) if sse.id and sse.id != previous_id else None
                previous_id = sse.id
                body = json.loads(sse.data)
                if not isinstance(body, dict):
                    raise ValueError("an event without the envelope=1 wrapper")
                if sse.event == "auth_expired":
                    raise _Retry(0.0)  # resume at once, with a fresh token
                event = Event(event_id, sse.event, body.get("topic"), body.get("data"))
                if event.type != "reset" and event_id is not None \
                        and self.last_event_id is not None and event_id <= self.last_event_id:
                    continue  # already yielded (a service that replays from before our id)
                if event_id is not None:
                    self.last_event_id = event_id
                yield event

    def _refuse(self, response: httpx.Response) -> None:
        status = response.status_code
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:200]
        if status == 401 and callable(self.token):
            raise _Retry(fresh_token=True)
        if status in (429, 503) and response.headers.get("retry-after", "").isdigit():
            raise _Retry(max(float(response.headers["retry-after"]), self.retry_ms / 1000))
        if 400 <= status < 500 and status != 429:
            raise ClientError(status, code, message)
        raise _Retry()  # 5xx, 429 without Retry-After: back off

    async def _token(self) -> str | None:
        source = self.token
        if source is None or isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        return value


class _borrowed:
    """A caller's ``httpx.AsyncClient``, used without closing it."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.http

    async def __aexit__(self, *exc_info: object) -> None:
        return None
