"""Prometheus as a gate provider, through prometheus-api-client (blocking: run off the loop)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from opsapi.gates.provider import Measurement


class PrometheusProvider:
    """Measures instant queries; every failure, empty result or NaN is no data."""

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 3.0,
        retries: int = 1,
        max_workers: int = 16,
    ) -> None:
        # A tight retry and timeout: a slow Prometheus must not stall the controller's pass.
        retry = Retry(total=retries, backoff_factor=0.1, status_forcelist=(502, 503, 504))
        self._client = PrometheusConnect(url, retry=retry, timeout=timeout_seconds)
        self._timeout = timeout_seconds
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="promql")

    async def measure(self, query: str) -> Measurement:
        """The query's single value; never raises."""
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._query, query),
                timeout=self._timeout * 3,
            )
        except TimeoutError:
            return Measurement(None, "prometheus did not answer in time")
        except Exception as error:
            return Measurement(None, _describe(error))
        return _single_value(result)

    def _query(self, query: str) -> Any:
        # Prometheus durations take no decimals: "3.0s" is refused, "3000ms" is not.
        timeout = f"{max(1, round(self._timeout * 1000))}ms"
        return self._client.custom_query(query, params={"timeout": timeout})

    def close(self) -> None:
        """Stop the worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)


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
    name = type(error).__name__
    if "PrometheusApiClientException" in name:
        return f"prometheus rejected the query: {str(error)[:300]}"
    if "ConnectionError" in name or "RetryError" in name:
        return "prometheus unavailable: connection failed"
    return f"prometheus unavailable: {name}"
