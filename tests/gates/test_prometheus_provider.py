"""The Prometheus provider never raises: every failure, empty answer or NaN is no data."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from opsapi.gates.prometheus import PrometheusProvider
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer

CASES = [
    pytest.param("vector(0.25)", 0.25, None, id="one-series"),
    pytest.param("scalar(vector(2))", 2.0, None, id="scalar"),
    # characters a query string must escape: +, &, #, =, %, quotes, a space, non-ASCII
    pytest.param(
        'vector(1) + scalar(count(up{job=~"a&b#c=d%e ü|.*"}) * 0 + 0.5)',
        1.5,
        None,
        id="escaped-characters",
    ),
    pytest.param('up{job="nonexistent"}', None, "no series", id="empty"),
    pytest.param("vector(0) / vector(0)", None, "NaN", id="nan"),
    pytest.param("vector(1) / vector(0)", None, "infinity", id="inf"),
    pytest.param(
        'label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")',
        None,
        "2 series",
        id="two-series",
    ),
    pytest.param("sum(rate(", None, "rejected the query: HTTP 400: bad_data", id="bad-promql"),
]


@pytest.mark.parametrize(("query", "value", "error"), CASES)
async def test_measure(
    prometheus: PrometheusServer, query: str, value: float | None, error: str | None
) -> None:
    provider = PrometheusProvider(prometheus.url, timeout_seconds=2)
    try:
        measurement = await provider.measure(query)
    finally:
        await provider.aclose()
    assert measurement.value == value
    if error is not None:
        assert error in (measurement.error or "")


async def test_many_queries_at_once_each_get_their_own_answer(
    prometheus: PrometheusServer,
) -> None:
    # given more concurrent queries than connections (as a controller pass makes)
    provider = PrometheusProvider(prometheus.url, timeout_seconds=2, max_connections=4)
    try:
        measurements = await asyncio.gather(*(provider.measure(f"vector({i})") for i in range(200)))
    finally:
        await provider.aclose()
    # then every query is answered with its own value, none lost or swapped
    assert [m.value for m in measurements] == [float(i) for i in range(200)]


async def test_unreachable_prometheus_is_no_data(metrics_app: MetricsApp) -> None:
    provider = PrometheusProvider("http://127.0.0.1:9", timeout_seconds=0.5, retries=0)
    try:
        measurement = await provider.measure("vector(1)")
    finally:
        await provider.aclose()
    assert measurement.value is None
    assert measurement.error == "prometheus unavailable: connection failed"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[str]:
    """A loopback server speaking whatever `handler` writes; yields its base URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://user:s3cret@127.0.0.1:{port}"
    finally:
        server.close()


async def test_a_hung_prometheus_is_no_data_within_the_timeout() -> None:
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)

    async with tcp_server(never_answers) as url:
        provider = PrometheusProvider(url, timeout_seconds=0.5, retries=1)
        started = time.monotonic()
        try:
            measurement = await provider.measure("vector(1)")
        finally:
            await provider.aclose()
    # a hung answer is not asked again: one timeout, not one per retry
    assert time.monotonic() - started < 1.2
    assert measurement.value is None
    assert measurement.error == "prometheus did not answer in time"


async def test_a_gateway_error_is_retried_then_no_data_without_credentials() -> None:
    requests: list[bytes] = []

    async def bad_gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        body = b"upstream s3cret down"
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    async with tcp_server(bad_gateway) as url:
        provider = PrometheusProvider(url, timeout_seconds=1, retries=1)
        try:
            measurement = await provider.measure("vector(1)")
        finally:
            await provider.aclose()
    # asked twice (one retry), with the URL's credentials as basic auth
    assert len(requests) == 2
    assert all(b"Authorization: Basic dXNlcjpzM2NyZXQ=" in r for r in requests)
    # then no data, saying why, with neither the password nor the answer's text
    assert measurement.value is None
    assert measurement.error == "prometheus unavailable: HTTP 503"


def answering(value: str, requests: list[bytes]) -> Handler:
    """A server that records each request's head and answers one series of `value`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        body = (
            b'{"status":"success","data":{"resultType":"vector",'
            b'"result":[{"metric":{},"value":[1,"%s"]}]}}' % value.encode()
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    return answer


async def test_queries_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxied: list[bytes] = []
    async with tcp_server(answering("0.5", proxied)) as proxy_url:
        # given a proxy in the environment and a Prometheus only it can reach
        monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("user:s3cret@", ""))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        provider = PrometheusProvider("http://prometheus.invalid:9090", timeout_seconds=1)
        try:
            # when the provider measures twice
            first = await provider.measure("vector(1)")
            second = await provider.measure("vector(1)")
        finally:
            await provider.aclose()
    # then both queries went to the proxy, for Prometheus's address, asking for no compression
    assert (first.value, second.value) == (0.5, 0.5)
    assert len(proxied) == 2
    assert all(r.startswith(b"GET http://prometheus.invalid:9090/api/v1/query?") for r in proxied)
    assert all(b"Accept-Encoding: identity" in r for r in proxied)


async def test_no_proxy_and_netrc_from_the_environment_apply(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    direct: list[bytes] = []
    async with tcp_server(answering("2", direct)) as url:
        # given a proxy that does not exist, NO_PROXY naming Prometheus's host, and .netrc
        # credentials for it
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login ops password fr0m-netrc\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        provider = PrometheusProvider(url.replace("user:s3cret@", ""), timeout_seconds=1)
        try:
            measurement = await provider.measure("vector(1)")
        finally:
            await provider.aclose()
    # then Prometheus was asked directly, with the .netrc credentials
    assert measurement.value == 2.0
    (request,) = direct
    assert request.startswith(b"GET /api/v1/query?")
    assert b"Authorization: Basic " + base64.b64encode(b"ops:fr0m-netrc") in request
