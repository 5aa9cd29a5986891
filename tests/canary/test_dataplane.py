"""The data plane (DESIGN §11): the weight endpoint answers from a copy kept fresh across
replicas, with ETags and long polls, and audits polls per caller, service and minute."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event

from opsapi.auth.tokens import LocalSigner
from opsapi.canary.dataplane import WeightCache, WeightDocument, minute_of
from opsapi.runtime import flush_polls
from tests.support.app import API, Harness
from tests.support.processes import free_ports, start_server, stop

SERVICE = "polled"


async def test_an_unchanged_weight_is_answered_304_without_the_database(api: Harness) -> None:
    assert (await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})).is_success
    first = await api.get(f"/canary/{SERVICE}/weight")
    assert first.status_code == 200
    assert first.json()["weight"] == 10
    assert first.json()["lease_seconds"] == 180
    etag = first.headers["etag"]

    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    sessions = api.runtime.sessions
    opened: list[object] = []

    def open_session() -> Any:
        opened.append(True)
        return sessions()

    event.listen(api.runtime.engine.sync_engine, "before_cursor_execute", count)
    api.runtime.sessions = open_session  # type: ignore[assignment]
    try:
        again = await api.client.get(
            f"{API}/canary/{SERVICE}/weight",
            headers={**api.auth("viewer"), "If-None-Match": etag},
        )
    finally:
        api.runtime.sessions = sessions
        event.remove(api.runtime.engine.sync_engine, "before_cursor_execute", count)
    assert again.status_code == 304
    assert again.headers["etag"] == etag
    assert statements == []  # neither the weight nor the audit touched the database
    assert opened == []  # nor opened a session (whose creation and close cost CPU)

    # when the weight changes, the tag does too
    api.clock.advance(minutes=30)
    assert (await api.post("/canary/promote", {"service": SERVICE})).is_success
    changed = await api.client.get(
        f"{API}/canary/{SERVICE}/weight", headers={**api.auth("viewer"), "If-None-Match": etag}
    )
    assert changed.status_code == 200
    assert changed.json()["weight"] == 25
    assert changed.headers["etag"] != etag


async def test_a_bad_wait_is_422(api: Harness) -> None:
    for wait in ("forever", "5m", "-1s"):
        response = await api.get(f"/canary/{SERVICE}/weight?wait={wait}")
        assert response.status_code == 422, (wait, response.text)


def test_a_long_poll_on_one_replica_returns_when_another_changes_the_weight(
    pg_url: str, key_file: Path, tmp_path: Path
) -> None:
    env = {"OPSAPI_DATABASE_URL": pg_url, "OPSAPI_LOCAL_KEY_FILE": str(key_file),
           "OPSAPI_CONTROLLER_ENABLED": "false", "OPSAPI_ENV": "test"}  # fmt: skip
    signer = LocalSigner.load_or_create(key_file)
    operator = {"Authorization": f"Bearer {signer.mint(subject='ops', roles=['operator'])}"}
    client = {"Authorization": f"Bearer {signer.mint(subject='pod-7', roles=['viewer'])}"}
    ports = free_ports(2)
    servers = [start_server(port, env, tmp_path / f"server-{port}.log") for port in ports]
    try:
        a, b = (f"http://127.0.0.1:{port}{API}" for port in ports)
        start = {"service": SERVICE, "version": "v2", "stable_version": "v1"}
        assert httpx.post(f"{b}/canary/promote", json=start, headers=operator).is_success
        # given a client holding a long poll on replica A with the current tag
        current = httpx.get(f"{a}/canary/{SERVICE}/weight", headers=client)
        etag = current.headers["etag"]
        polls = 2
        result: dict[str, Any] = {}

        async def poll_and_change() -> None:
            async with httpx.AsyncClient(timeout=40) as http:
                waiting = asyncio.create_task(http.get(
                    f"{a}/canary/{SERVICE}/weight?wait=30s",
                    headers={**client, "If-None-Match": etag},
                ))  # fmt: skip
                await asyncio.sleep(1.0)
                assert not waiting.done()  # it holds while nothing changes
                # when an operator rolls back on replica B
                rollback = {"service": SERVICE, "reason": "errors"}
                answer = await http.post(f"{b}/canary/rollback", json=rollback, headers=operator)
                changed_at = time.monotonic()
                assert answer.is_success
                response = await waiting
                result["latency"] = time.monotonic() - changed_at
                result["response"] = response

        asyncio.run(poll_and_change())
        # then the long poll on A answers the new weight within 100 ms of B's answer
        response = result["response"]
        assert response.status_code == 200
        assert (response.json()["weight"], response.json()["state"]) == (0, "rolled_back")
        assert result["latency"] < 0.1, result["latency"]

        # and the rollback is applied by that fetch, recorded once though both replicas serve it
        assert httpx.get(f"{b}/canary/{SERVICE}/weight", headers=client).json()["weight"] == 0
        polls += 1
        view: dict[str, Any] = {}
        for _ in range(100):
            view = httpx.get(f"{b}/canary/{SERVICE}", headers=operator).json()
            if view["traffic_at_zero"]:
                break
            time.sleep(0.05)
        assert (view["applied_weight"], view["traffic_at_zero"]) == (0, True), view
        assert view["time_to_safe"]["applied_at"] is not None
        time.sleep(0.3)  # B's own record of its fetch, if it wrongly made one, has landed
        applies = asyncio.run(_rows(pg_url, APPLIES))
        assert [(row["weight"], row["reason"]) for row in applies] == [
            (10, "fetched by pod-7"),
            (0, "fetched by pod-7"),
        ]

        # and when the servers stop, the polls are audited as one event per caller and minute
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)
        rows = asyncio.run(_rows(pg_url, POLL_EVENTS))
        assert sum(row["polls"] for row in rows if row["actor"] == "pod-7") == polls
        assert {row["service"] for row in rows} == {SERVICE}
    finally:
        for server in servers:
            stop(server)


APPLIES = (
    "SELECT (details->>'weight')::int AS weight, details->>'reason' AS reason"
    " FROM audit_event WHERE action = 'router.apply' ORDER BY id"
)
POLL_EVENTS = (
    "SELECT actor, service, (details->>'polls')::int AS polls FROM audit_event"
    " WHERE action = 'canary.weight.polls'"
)


async def _rows(url: str, query: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        return [dict(row) for row in await connection.fetch(query)]
    finally:
        await connection.close()


async def test_watching_a_rollout_is_audited_once_a_minute_plus_a_count(api: Harness) -> None:
    assert (await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})).is_success
    # when one person watches the rollout (a read every few seconds) and another looks once
    for _ in range(5):
        assert (await api.get(f"/canary/{SERVICE}")).status_code == 200
    other = await api.client.get(f"{API}/canary/{SERVICE}", headers=api.auth("viewer", "bob"))
    assert other.status_code == 200
    api.clock.advance(minutes=1)
    assert (await api.get(f"/canary/{SERVICE}")).status_code == 200

    # then each caller's first read in a minute is its own event, the repeats one count
    await flush_polls(api.runtime, final=True)
    reads = [
        (e.actor, e.request_id is not None) for e in await api.audit_events(action="canary.get")
    ]
    assert reads == [("viewer-user", True), ("bob", True), ("viewer-user", True)]
    [repeats] = await api.audit_events(action="canary.get.repeats")
    assert (repeats.actor, repeats.service, repeats.details["polls"]) == ("viewer-user", SERVICE, 4)


async def test_the_database_announces_changes_to_what_the_weight_answer_shows(
    api: Harness,
) -> None:
    # given a listener on the data plane's channel and a started rollout
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(str(api.runtime.engine.url).replace("+asyncpg", ""))
    await listener.add_listener("opsapi_weights", lambda *args: heard.put_nowait(args[3]))
    try:
        assert (await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})).is_success
        assert await asyncio.wait_for(heard.get(), 5) == SERVICE
        while not heard.empty():
            heard.get_nowait()
        # when only bookkeeping the answer does not show changes (the controller's next due
        # time, the applied weight), nothing is announced
        await listener.execute(
            "UPDATE rollout SET next_evaluation_at = now(), applied_weight = 10,"
            " router_checked_at = now() WHERE service = $1",
            SERVICE,
        )
        await asyncio.sleep(0.3)
        assert heard.empty()
        # and a rollback (weight, state, generation) is announced once it commits
        assert (await api.post("/canary/rollback", {"service": SERVICE, "reason": "x"})).is_success
        assert await asyncio.wait_for(heard.get(), 5) == SERVICE
    finally:
        await listener.close()


async def test_a_change_announced_while_the_copy_loads_is_not_hidden_by_that_load() -> None:
    # given a load that read the old weight and is still running when the change is announced
    cache = WeightCache()
    cache.listening = True
    documents = iter([_weight(10), _weight(20)])
    reading = asyncio.Event()
    announced = asyncio.Event()

    async def load(_service: str) -> WeightDocument:
        document = next(documents)
        reading.set()
        await announced.wait()
        return document

    first = asyncio.create_task(cache.get("checkout", load))
    await reading.wait()
    cache.invalidate("checkout")
    announced.set()

    # then the load is made again, and what is kept and answered is the changed weight
    assert (await first).body == _weight(20).body
    assert (await cache.get("checkout", load)).body == _weight(20).body


def _weight(percent: int) -> WeightDocument:
    return WeightDocument.of({"weight": percent}, generation=percent, pull=True)


@pytest.mark.parametrize(
    "at",
    [
        datetime(2026, 12, 1, 19, 5, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2026, 12, 1, 0, 0),  # naive
        datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
        datetime(1000, 1, 1, tzinfo=UTC),
        datetime(999, 1, 1, tzinfo=UTC),  # strftime does not pad the year
        datetime(1, 1, 1),
    ],
)
def test_a_polls_minute_is_the_minute_strftime_writes(at: datetime) -> None:
    assert minute_of(at) == at.strftime("%Y-%m-%dT%H:%M")


@pytest.mark.parametrize(
    ("failures", "recorded", "calls"),
    [
        (0, True, 1),
        (2, True, 3),  # a deadlock or a lost connection: tried again without another fetch
        (9, False, 4),  # bounded: then left to the next fetch
    ],
)
async def test_a_fetch_whose_recording_fails_is_recorded_again(
    failures: int, recorded: bool, calls: int
) -> None:
    # given a recorder that fails `failures` times before it works
    cache = WeightCache(record_retry_delays=(0.01, 0.01, 0.01))
    attempts: list[tuple[int, int]] = []

    async def record(rollout_id: int, generation: int) -> bool:
        attempts.append((rollout_id, generation))
        if len(attempts) <= failures:
            raise ConnectionResetError("connection lost")
        return True

    document = WeightDocument.of({"weight": 10, "rollout_id": 7}, generation=3, pull=True)

    # when one client fetches the document once
    cache.fetched("checkout", document, record)
    await cache.settle()

    # then it was recorded without another fetch, unless every attempt failed
    assert attempts == [(7, 3)] * calls
    # and a second fetch of that generation tries again only when no attempt worked
    cache.fetched("checkout", document, record)
    await cache.settle()
    assert len(attempts) == calls + (0 if recorded else calls)
