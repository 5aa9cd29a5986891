"""Audit retention: `opsapi audit archive` exports the oldest events, verifies the file, records
a signed checkpoint and only then removes them; verification starts from the checkpoint and
the archive verifies offline, on its own."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from opsapi import cli
from opsapi.audit.archive import ArchiveError, archive, companion_path, verify_file
from opsapi.audit.checkpoint import CheckpointKey
from tests.audit.test_review_api import audit_get, insert_events
from tests.support.app import Harness

# Event times, all in the past (the archive's own audit event is written at the real time).
OLD = datetime(2026, 6, 1, tzinfo=UTC)
CUTOFF = OLD + timedelta(days=20)
MIDDLE = OLD + timedelta(days=25)
LATER_CUTOFF = OLD + timedelta(days=30)
RECENT = OLD + timedelta(days=40)


async def archive_old(
    api: Harness, tmp_path: Path, name: str = "a1.ndjson", before: datetime = CUTOFF
) -> dict[str, Any]:
    """Archive the events before `before` into `tmp_path/name` with the test key."""
    key = CheckpointKey.load_or_create(tmp_path / "archive-key.pem")
    return await archive(api.runtime.engine, before=before, out=tmp_path / name, key=key)


async def stored(api: Harness) -> list[tuple[int, str]]:
    async with api.runtime.engine.connect() as connection:
        result = await connection.execute(sa.text("SELECT id, hash FROM audit_event ORDER BY id"))
        return [(int(row[0]), str(row[1])) for row in result]


def archived(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines[:-1]]


async def verify(api: Harness, **params: Any) -> dict[str, Any]:
    response = await audit_get(api, "/audit/verify", **params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def verify_archive_cli(
    capsys: pytest.CaptureFixture[str], *args: str | Path
) -> tuple[int, dict[str, Any], str]:
    """`opsapi audit verify-archive ARGS` in-process: (exit code, JSON report, stderr)."""
    code = cli.main(["audit", "verify-archive", *(str(arg) for arg in args)])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else {}, err


async def test_ten_thousand_events_archived_leave_a_chain_verified_from_the_checkpoint(
    api_any_db: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # given 10,000 events older than the cutoff and 50 recent ones
    api = api_any_db
    await insert_events(api, 10_000, start=OLD)
    await insert_events(api, 50, seed=2, start=RECENT)
    before = await stored(api)

    # when the old events are archived
    result = await archive_old(api, tmp_path)

    # then the archive holds exactly the old events, in chain order, with their hashes
    out = tmp_path / "a1.ndjson"
    events = archived(out)
    assert [(event["id"], event["hash"]) for event in events] == before[:10_000]
    assert result["removed"] == 10_000
    checkpoint = result["checkpoint"]
    span = (checkpoint["first_id"], checkpoint["last_id"], checkpoint["events"])
    assert span == (1, 10_000, 10_000)
    assert (checkpoint["anchor_id"], checkpoint["last_hash"]) == (None, before[9_999][1])
    # and only the recent events remain, followed by the archive's own audit event
    remaining = await stored(api)
    assert remaining[:50] == before[10_000:]
    [record] = await api.audit_events(action="audit.archive")
    assert record.details["checkpoint_id"] == checkpoint["id"]
    assert record.details["archive_sha256"] == checkpoint["archive_sha256"]

    # and /audit/verify starts from the checkpoint and finds the rest intact
    report = await verify(api)
    assert report["intact"] is True
    assert report["events"] == len(remaining)
    assert report["checkpoint"]["last_id"] == 10_000
    assert report["checkpoint"]["key_id"] == checkpoint["key_id"]
    assert "pending_removal" not in report

    # and the archive verifies offline, with its signed checkpoint, pinned to the key
    code, offline, _ = verify_archive_cli(capsys, out, "--key-id", checkpoint["key_id"])
    assert code == 0, offline
    assert offline["intact"] is True
    assert (offline["events"], offline["last_hash"]) == (10_000, before[9_999][1])
    assert offline["checkpoint"] == {"id": checkpoint["id"], "key_id": checkpoint["key_id"],
                                     "signature": "valid"}  # fmt: skip


async def test_a_second_archive_continues_from_the_first_checkpoint(
    api_any_db: Harness, tmp_path: Path
) -> None:
    # given events before the cutoff, then events of the next period, and a first archive
    api = api_any_db
    await insert_events(api, 300, start=OLD)
    await insert_events(api, 200, seed=3, start=MIDDLE)
    first = (await archive_old(api, tmp_path, "a1.ndjson"))["checkpoint"]
    assert first["events"] == 300

    # when the next period is archived into another file
    second = (await archive_old(api, tmp_path, "a2.ndjson", LATER_CUTOFF))["checkpoint"]

    # then the second archive starts exactly where the first checkpoint ended
    assert (second["anchor_id"], second["anchor_hash"]) == (first["last_id"], first["last_hash"])
    assert (second["first_id"], second["events"]) == (301, 200)
    report = verify_file(tmp_path / "a2.ndjson")
    assert report["anchor"] == {"id": first["last_id"], "hash": first["last_hash"]}
    chain = await verify(api)
    assert (chain["intact"], chain["checkpoints"]) == (True, 2)
    assert chain["checkpoint"]["id"] == second["id"]


async def test_re_running_an_archive_is_safe(api_any_db: Harness, tmp_path: Path) -> None:
    # given a completed archive
    api = api_any_db
    await insert_events(api, 100, start=OLD)
    await insert_events(api, 10, seed=4, start=MIDDLE)
    done = await archive_old(api, tmp_path)
    content = (tmp_path / "a1.ndjson").read_bytes()

    # when the same command runs again, it finds its work complete and changes nothing
    again = await archive_old(api, tmp_path)
    assert again["resumed"] is True
    assert (again["checkpoint"], again["removed"]) == (done["checkpoint"], 0)
    assert (tmp_path / "a1.ndjson").read_bytes() == content

    # when an archive would overwrite the file an older checkpoint names, it is refused
    await archive_old(api, tmp_path, "a2.ndjson", LATER_CUTOFF)
    with pytest.raises(ArchiveError, match="never overwritten"):
        await archive_old(api, tmp_path, "a1.ndjson", LATER_CUTOFF)
    assert (tmp_path / "a1.ndjson").read_bytes() == content

    # and with nothing older than the cutoff left (the next event is the first archive's
    # own audit event), nothing is written
    nothing = await archive_old(api, tmp_path, "a3.ndjson", LATER_CUTOFF)
    assert nothing["archived"] == 0
    assert not (tmp_path / "a3.ndjson").exists()


async def test_a_broken_chain_is_never_archived(api: Harness, tmp_path: Path) -> None:
    # given an event edited behind the application's back in the range to archive
    await insert_events(api, 200, start=OLD)
    async with api.runtime.engine.begin() as connection:
        await connection.execute(
            sa.text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only")
        )
        await connection.execute(sa.text("UPDATE audit_event SET actor = 'x' WHERE id = 120"))
        await connection.execute(
            sa.text("ALTER TABLE audit_event ENABLE TRIGGER audit_event_append_only")
        )
    before = await stored(api)

    # when archiving, the export's verification finds it and the archive stops
    with pytest.raises(ArchiveError, match=r"line 120 \(event 120\): hash mismatch"):
        await archive_old(api, tmp_path)

    # then nothing was checkpointed or removed, and no archive file was left
    assert await stored(api) == before
    assert (await verify(api))["first_broken"]["id"] == 120
    assert "checkpoint" not in await verify(api)
    assert not (tmp_path / "a1.ndjson").exists()


async def test_verify_after_an_archive_reports_breaks_from_the_checkpoint(
    api: Harness, tmp_path: Path
) -> None:
    # given an archive, then more events
    await insert_events(api, 100, start=OLD)
    checkpoint = (await archive_old(api, tmp_path))["checkpoint"]
    await insert_events(api, 20, seed=6, start=RECENT)
    remaining = await stored(api)

    # then an anchor kept from before the archive is reported as archived, not as truncation
    archived_head = await verify(
        api, expect_head=f"50:{archived(tmp_path / 'a1.ndjson')[49]['hash']}"
    )
    assert archived_head["intact"] is True
    assert archived_head["expected_head"]["archived"] is True
    assert archived_head["expected_head"]["matches"] is None
    # (the checkpoint's own last event still matches, by the hash the checkpoint keeps)
    last = await verify(api, expect_head=f"{checkpoint['last_id']}:{checkpoint['last_hash']}")
    assert last["expected_head"]["matches"] is True
    # and an archived since_id is refused as such
    refused = await audit_get(api, "/audit/verify", since_id=5)
    assert refused.status_code == 422
    assert "archived" in refused.json()["detail"]

    # when the first event after the checkpoint is deleted behind the application's back
    async with api.runtime.engine.begin() as connection:
        await connection.execute(
            sa.text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only")
        )
        await connection.execute(sa.text(f"DELETE FROM audit_event WHERE id = {remaining[0][0]}"))
        await connection.execute(
            sa.text("ALTER TABLE audit_event ENABLE TRIGGER audit_event_append_only")
        )

    # then the next one no longer follows the checkpoint's hash
    report = await verify(api)
    assert report["first_broken"] == {
        "id": remaining[1][0],
        "reason": "prev_hash mismatch",
        "expected": checkpoint["last_hash"],
        "found": remaining[0][1],
    }


async def test_a_checkpoint_edited_behind_the_application_is_reported(
    api: Harness, tmp_path: Path
) -> None:
    # given an archive whose checkpoint is later edited with the triggers disabled
    await insert_events(api, 100, start=OLD)
    checkpoint = (await archive_old(api, tmp_path))["checkpoint"]
    async with api.runtime.engine.begin() as connection:
        await connection.execute(sa.text("SET LOCAL session_replication_role = replica"))
        await connection.execute(sa.text("UPDATE audit_checkpoint SET archive_name = 'elsewhere'"))

    # then verification fails at the checkpoint
    report = await verify(api)
    assert report["intact"] is False
    assert report["first_broken"] == {"id": checkpoint["last_id"],
                                      "checkpoint_id": checkpoint["id"],
                                      "reason": "checkpoint signature invalid"}  # fmt: skip


# --- offline verification of a damaged archive -------------------------------------------------


def _edit(lines: list[str], index: int) -> None:
    event = json.loads(lines[index])
    event["actor"] = "mallory"
    lines[index] = json.dumps(event)


def _edit_and_rehash(lines: list[str], index: int) -> None:
    from opsapi.audit.chain import link

    event = json.loads(lines[index])
    event["actor"] = "mallory"
    event["hash"] = link(event["prev_hash"], event)
    lines[index] = json.dumps(event)


def _swap(lines: list[str], index: int) -> None:
    lines[index], lines[index + 1] = lines[index + 1], lines[index]


DAMAGE = [
    # (what is done, line index it is done at, expected line, expected reason)
    pytest.param(_edit, 41, 42, "hash mismatch", id="edited-event"),
    pytest.param(_edit_and_rehash, 41, 43, "prev_hash mismatch", id="edited-and-rehashed"),
    pytest.param(_swap, 41, 42, "prev_hash mismatch", id="reordered-lines"),
    pytest.param(lambda lines, i: lines.pop(i), 41, 42, "prev_hash mismatch", id="removed-line"),
    pytest.param(
        lambda lines, i: lines.pop(),
        0,
        100,
        "no manifest: the archive is incomplete",
        id="cut-before-the-manifest",
    ),
    pytest.param(
        lambda lines, i: lines.__setitem__(i, lines[i][:30]), 41, 42, "not JSON", id="torn-line"
    ),
]


@pytest.mark.parametrize(("damage", "index", "line", "reason"), DAMAGE)
async def test_a_damaged_archive_fails_offline_verification_naming_the_line(
    sqlite_url: str,
    key_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Any,
    index: int,
    line: int,
    reason: str,
) -> None:
    from tests.support.app import running_app

    # given an archive of 100 events that verifies
    async with running_app(sqlite_url, key_file) as api:
        await insert_events(api, 100, start=OLD)
        await archive_old(api, tmp_path)
    out = tmp_path / "a1.ndjson"
    assert verify_archive_cli(capsys, out)[0] == 0

    # when one line is damaged
    lines = out.read_text("utf-8").splitlines()
    damage(lines, index)
    out.write_text("\n".join(lines) + "\n", "utf-8")

    # then offline verification fails, naming the line
    code, report, err = verify_archive_cli(capsys, out, "--checkpoint", companion_path(out))
    assert code == 1
    assert (report["intact"], report["line"], report["reason"]) == (False, line, reason)
    assert f"line {line}" in err
    assert reason in err


async def test_an_archive_must_match_its_signed_checkpoint(
    sqlite_url: str, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # given two archives and their checkpoints
    from tests.support.app import running_app

    async with running_app(sqlite_url, key_file) as api:
        await insert_events(api, 60, start=OLD)
        await insert_events(api, 60, seed=7, start=MIDDLE)
        await archive_old(api, tmp_path, "a1.ndjson")
        await archive_old(api, tmp_path, "a2.ndjson", LATER_CUTOFF)
    a1, a2 = tmp_path / "a1.ndjson", tmp_path / "a2.ndjson"
    checkpoint = json.loads(companion_path(a1).read_text("utf-8"))
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**checkpoint, "last_id": checkpoint["last_id"] + 1}), "utf-8")
    other_key = CheckpointKey.load_or_create(tmp_path / "other-key.pem").key_id

    for args, reason in [
        ((a1, "--checkpoint", companion_path(a2)), "the checkpoint names another file"),
        ((a1, "--checkpoint", forged), "checkpoint signature invalid"),
        ((a1, "--key-id", other_key), f"not {other_key}"),
    ]:
        code, report, err = verify_archive_cli(capsys, *args)
        assert code == 1, args
        assert reason in report["reason"], report
        assert reason in err

    # and an anchor kept earlier is found in the archive that holds it
    event = archived(a1)[10]
    code, report, _ = verify_archive_cli(
        capsys, a1, "--expect-head", f"{event['id']}:{event['hash']}"
    )
    assert (code, report["expected_head"]["matches"]) == (0, True)
    code, report, _ = verify_archive_cli(capsys, a1, "--expect-head", f"{event['id']}:{'0' * 64}")
    assert (code, report["reason"]) == (1, "expected head differs")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["archive", "--before", "last month", "--out", "{tmp}/a"], 2, "RFC 3339"),
        (["archive", "--before", "2026-02-30", "--out", "{tmp}/a"], 2, "not a date"),
        (["archive", "--before", "2026-06-01T00:00:00", "--out", "{tmp}/a"], 2, "RFC 3339"),
        (["archive", "--before", "2999-01-01", "--out", "{tmp}/a"], 2, "in the future"),
        (["archive", "--before", "2026-06-01", "--out", "{tmp}/no/a"], 2, "does not exist"),
        (["verify-archive", "{tmp}/a", "--key-id", "cb32"], 2, "--key-id must be 64 hex"),
        (["verify-archive", "{tmp}/a", "--expect-head", "0:ab"], 2, "--expect-head must be"),
        (["verify-archive", "{tmp}/missing.ndjson"], 1, "cannot read"),
        (["verify-archive", "{tmp}/a", "--checkpoint", "{tmp}/a"], 1, "not a checkpoint"),
    ],
)
def test_bad_audit_command_lines_are_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    (tmp_path / "a").write_text("not an archive\n", "utf-8")

    result = cli.main(["audit", *(arg.format(tmp=tmp_path) for arg in args)])

    out, err = capsys.readouterr()
    assert (result, out) == (code, "")
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
