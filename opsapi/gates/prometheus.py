"""Prometheus as a gate provider: instant queries over its HTTP API, on the event loop.

aiohttp rather than prometheus-api-client (requests, in threads), answers asked uncompressed,
and the environment's proxy settings read once rather than on every query: a query costs the
controller about 0.36 ms of CPU and Prometheus 0.44 ms (1.2 and 1.4 ms before the last two),
which is what lets one process judge 3,000 rollouts x 3 gates within a tick on two cores
(`benchmarks/controller_ticks.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
from yarl import URL

from opsapi.gates.provider import Measurement

# An answer is a few hundred bytes: gzip would cost Prometheus about 1 ms of CPU per query (a
# new compressor each time) and the controller another 0.2 ms, to save nothing on loopback.
_HEADERS = {"Accept-Encoding": "identity"}

# Answers worth one more try: a proxy or Prometheus itself briefly unavailable.
_RETRY_STATUSES = frozenset({502, 503, 504})


class PrometheusProvider:
    """Measures instant queries; every failure, empty result or NaN is no data."""

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 3.0,
        retries: int = 1,
        max_connections: int = 32,
    ) -> None:
        self._query_url = url.rstrip("/") + "/api/v1/query"
        self._timeout = timeout_seconds
        self._retries = retries
        self._max_connections = max_connections
        # Prometheus durations take no decimals: "3.0s" is refused, "3000ms" is not.
        self._server_timeout = f"{max(1, round(timeout_seconds * 1000))}ms"
        self._session: aiohttp.ClientSession | None = None
        self._route = _Route.from_environment(self._query_url)

    async def measure(self, query: str) -> Measurement:
        """The query's single value; never raises."""
        try:
            # A tight bound over every attempt: a slow Prometheus must not stall the pass.
            result = await asyncio.wait_for(
                self._query(query), timeout=self._timeout * (self._retries + 1) + 0.5
            )
        except TimeoutError:
            return Measurement(None, "prometheus did not answer in time")
        except _Rejected as rejected:
            return Measurement(None, f"prometheus rejected the query: {rejected.reason[:300]}")
        except _Unavailable as unavailable:
            return Measurement(None, f"prometheus unavailable: {unavailable.reason}")
        except Exception as error:
            return Measurement(None, _describe(error))
        return _single_value(result)

    async def _query(self, query: str) -> Any:
        session = self._client()
        route = self._route
        url = _query_url(self._query_url, query, self._server_timeout)
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                async with session.get(
                    url,
                    proxy=route.proxy,
                    proxy_auth=route.proxy_auth,
                    headers=route.headers,
                ) as response:
                    body = await response.read()
                    status = response.status
            except TimeoutError:
                raise  # a hung Prometheus: asking again would only double the wait
            except aiohttp.ClientConnectionError:
                if last:
                    raise
            else:
                if status == 200:
                    return json.loads(body)["data"]["result"]
                if status not in _RETRY_STATUSES:
                    raise _Rejected(_error_text(body, status))
                if last:
                    raise _Unavailable(f"HTTP {status}")
            await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the event loop that runs it.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                # The environment's proxy and .netrc apply, read once (`_Route`): aiohttp's
                # trust_env reads them on every request, in two threads.
                trust_env=False,
                headers=_HEADERS,
                raise_for_status=False,
            )
        return self._session

    async def aclose(self) -> None:
        """Close the connections kept open to Prometheus."""
        if self._session is not None:
            await self._session.close()
            self._session = None


@functools.lru_cache(maxsize=16384)
def _query_url(base: str, query: str, timeout: str) -> URL:
    # Cached: a controller asks the same few thousand queries in every pass, and encoding one
    # into a URL costs about as much as the rest of the request's preparation.
    return URL(base).with_query(query=query, timeout=timeout)


@dataclass(frozen=True)
class _Route:
    """How queries reach Prometheus, from the environment as requests and curl read it:
    HTTP(S)_PROXY unless NO_PROXY names the host, and credentials for the host in .netrc."""

    proxy: URL | None
    proxy_auth: aiohttp.BasicAuth | None
    headers: dict[str, str] | None  # the .netrc credentials

    @classmethod
    def from_environment(cls, url: str) -> _Route:
        """The route for `url` per the environment now."""
        target = URL(url)
        proxy = proxy_auth = headers = None
        with contextlib.suppress(LookupError):
            proxy, proxy_auth = get_env_proxy_for_url(target)
        if target.user is None and target.host is not None:
            # Credentials in the URL win, as aiohttp's own lookup has them.
            with contextlib.suppress(LookupError):
                auth = basicauth_from_netrc(netrc_from_env(), target.host)
                headers = {"Authorization": auth.encode()}
        return cls(proxy, proxy_auth, headers)


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Unavailable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _error_text(body: bytes, status: int) -> str:
    # Prometheus explains a refusal in its JSON ("bad_data: parse error ..."); show that.
    try:
        answer = json.loads(body)
        return f"HTTP {status}: {answer['errorType']}: {answer['error']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


def _single_value(result: Any) -> Measurement:
    if isinstance(result, list) and len(result) == 2 and isinstance(result[0], int | float):
        result = [{"value": result}]  # a scalar query answers a bare [time, "value"] pair
    if not isinstance(result, list) or not result:
        return Measurement(None, "query returned no series")
    if len(result) > 1:
        return Measurement(None, f"query returned {len(result)} series; aggregate it to one")
    try:
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return Measurement(None, "query returned an unreadable sample")
    if math.isnan(value) or math.isinf(value):
        return Measurement(None, "query returned NaN or infinity")
    return Measurement(value)


def _describe(error: Exception) -> str:
    # Connection errors' text can carry URLs with credentials: name the class only.
    if isinstance(error, aiohttp.ClientConnectionError):
        return "prometheus unavailable: connection failed"
    if isinstance(error, ValueError | KeyError | TypeError):
        return "prometheus unavailable: unreadable answer"
    return f"prometheus unavailable: {type(error).__name__}"
