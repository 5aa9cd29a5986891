"""Verify checks every row, and the published chain head lets an external copy detect a
truncated log or a forged, correctly re-hashed tail."""

from __future__ import annotations

import json
from typing import Any

import pytest

from opsapi.audit.chain import GENESIS, link
from opsapi.metrics import Metrics
from tests.audit.test_review_api import audit_get, insert_events, synthetic_rows
from tests.audit.test_verify import tamper, verify
from tests.support.app import Harness


def head_param(head: dict[str, Any]) -> str:
    return f"{head['id']}:{head['hash']}"


@pytest.mark.parametrize("forged_id", [-5, 0])
async def test_a_row_with_an_id_below_one_is_verified(api_any_db: Harness, forged_id: int) -> None:
    # given an intact chain, and a row inserted behind the application's back with a low id
    # and made-up hashes (the query answers it, the export lists it first)
    await insert_events(api_any_db, 20)
    await tamper(
        api_any_db,
        "INSERT INTO audit_event (id, at, actor, roles, source, action, outcome, details, "
        f"prev_hash, hash) VALUES ({forged_id}, '2026-09-01 00:00:00+00', 'mallory', '[]', "
        "'api', 'canary.rollback', 'success', '{}', 'garbage', 'garbage')",
    )

    # when the chain is verified
    report = await verify(api_any_db)

    # then that row is the first break
    assert report["intact"] is False
    assert report["first_broken"] == {
        "id": forged_id, "reason": "prev_hash mismatch", "expected": GENESIS, "found": "garbage"
    }  # fmt: skip


async def test_the_answer_publishes_the_head(api_any_db: Harness) -> None:
    await insert_events(api_any_db, 30)
    [newest] = (await api_any_db.audit_events())[-1:]

    report = await verify(api_any_db)

    assert report["head"] == {"id": newest.id, "hash": newest.hash}
    assert (report["last_id"], report["last_hash"]) == (newest.id, newest.hash)


async def test_an_expected_head_still_in_the_chain_is_confirmed(api_any_db: Harness) -> None:
    # given a head copied elsewhere, then more events
    await insert_events(api_any_db, 30)
    kept = (await verify(api_any_db))["head"]
    await insert_events(api_any_db, 10, seed=2)
    newest = (await api_any_db.audit_events())[-1]

    # when the chain is verified against the copy (whole, and from the copy on)
    whole = await verify(api_any_db, expect_head=head_param(kept))
    tail = await verify(api_any_db, expect_head=head_param(kept), since_id=kept["id"])

    # then the copy is still in the chain
    for report in (whole, tail):
        assert report["intact"] is True
        assert report["expected_head"] == {**kept, "found": kept["hash"], "matches": True}
    # (the tail: the kept event, the first verification's own event, and the 10 after them)
    assert tail["events"] == newest.id - kept["id"] + 2


async def test_a_truncated_log_is_detected_with_an_expected_head(api_any_db: Harness) -> None:
    # given a head copied elsewhere, then the newest events deleted behind the application
    await insert_events(api_any_db, 30)
    kept = (await verify(api_any_db))["head"]
    await tamper(api_any_db, f"DELETE FROM audit_event WHERE id > {kept['id'] - 3}")

    # when the chain is verified: on its own it looks intact
    assert (await verify(api_any_db))["intact"] is True
    report = await verify(api_any_db, expect_head=head_param(kept))

    # then against the copy it is not: the expected head is missing
    assert report["intact"] is False
    assert report["first_broken"] == {
        "id": kept["id"], "reason": "expected head missing", "expected": kept["hash"],
        "found": None,
    }  # fmt: skip
    assert report["expected_head"]["matches"] is False
    assert report["head"] != kept
    [event] = (await api_any_db.audit_events(action="audit.verify"))[-1:]
    assert (event.details["intact"], event.details["reason"]) == (False, "expected head missing")


async def test_a_forged_re_hashed_tail_is_detected_with_an_expected_head(api: Harness) -> None:
    # given a head copied elsewhere, then an attacker with write access who deletes the last
    # 5 events and appends 6 forged ones in their place, re-hashed correctly
    await insert_events(api, 30)
    kept = (await verify(api))["head"]
    survivors = (await api.audit_events())[:-5]
    statements = [f"DELETE FROM audit_event WHERE id > {survivors[-1].id}"]
    previous = survivors[-1].hash
    for offset, forged in enumerate(synthetic_rows(6, seed=9), start=1):
        digest = link(previous, forged)
        statements.append(insert_statement(survivors[-1].id + offset, forged, previous, digest))
        previous = digest
    statements.append("SELECT setval('audit_event_id_seq', (SELECT max(id) FROM audit_event))")
    await tamper(api, *statements)

    # when the chain is verified: on its own it is intact, and longer than before
    alone = await verify(api)
    assert alone["intact"] is True
    assert alone["head"]["id"] > kept["id"]

    # then against the copy, the event at the copied id has another hash
    report = await verify(api, expect_head=head_param(kept))
    assert report["intact"] is False
    [event] = await api.audit_events(id=kept["id"])
    assert report["first_broken"] == {
        "id": kept["id"], "reason": "expected head differs", "expected": kept["hash"],
        "found": event.hash,
    }  # fmt: skip


def insert_statement(event_id: int, row: dict[str, Any], prev_hash: str, digest: str) -> str:
    """An INSERT of `row` (an event_row) with the given id and hashes, as an attacker writes."""
    values = {**row, "id": event_id, "at": row["at"].isoformat(), "prev_hash": prev_hash,
              "hash": digest, "roles": json.dumps(row["roles"]),
              "details": json.dumps(row["details"])}  # fmt: skip
    columns = ", ".join(values)
    literals = ", ".join(_literal(value) for value in values.values())
    return f"INSERT INTO audit_event ({columns}) VALUES ({literals})"


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


@pytest.mark.parametrize(
    "params",
    [
        {"expect_head": "12"},
        {"expect_head": "12:abc"},
        {"expect_head": "0:" + "a" * 64},
        {"expect_head": "-5:" + "a" * 64},
        {"expect_head": "x:" + "a" * 64},
        {"expect_head": "12:" + "g" * 64},
        {"expect_head": "5:" + "a" * 64, "since_id": "6"},
    ],
)
async def test_invalid_expected_heads_are_422(api: Harness, params: dict[str, Any]) -> None:
    await insert_events(api, 10)

    response = await audit_get(api, "/audit/verify", **params)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_head_id_is_a_metric(api: Harness) -> None:
    # given events, and a metrics registry on which the head is published
    await insert_events(api, 25)
    metrics = Metrics()
    from opsapi.audit.verify import publish_head

    head = await publish_head(api.runtime.engine, metrics)

    assert head is not None
    assert head.id == 25
    assert metrics.registry.get_sample_value("opsapi_audit_head_id") == 25


async def test_metrics_show_the_head_after_a_verification(api: Harness) -> None:
    await insert_events(api, 25)
    await verify(api)  # audited itself: event 26

    response = await api.client.get("/metrics")

    assert "opsapi_audit_head_id 26.0" in response.text


async def test_metrics_show_the_head_without_a_verification(api: Harness) -> None:
    await insert_events(api, 25)

    response = await api.client.get("/metrics")

    assert "opsapi_audit_head_id 25.0" in response.text
