"""The canary API end to end: real database, real auth, real audit; the clock moved by hand."""

from __future__ import annotations

from tests.support.app import Harness


async def test_promote_starts_at_the_first_step(api_any_db: Harness) -> None:
    # when an operator promotes a version of a service with no rollout
    response = await api_any_db.post("/canary/promote", {"service": "checkout", "version": "v2"})

    # then a rollout starts at 10 %, published for the pull router's clients
    assert response.status_code == 200, response.text
    rollout = response.json()
    assert rollout["state"] == "progressing"
    assert (rollout["desired_weight"], rollout["applied_weight"]) == (10, None)
    assert rollout["triggered_by"] == "user"
    weight = await api_any_db.get("/canary/checkout/weight")
    assert weight.json()["weight"] == 10
    # and applied once a client has fetched it
    view = await api_any_db.fetch_weight("checkout")
    assert view["desired_weight"] == view["applied_weight"] == 10


async def start(api: Harness, service: str = "checkout", version: str = "v2") -> dict[str, object]:
    response = await api.post("/canary/promote", {"service": service, "version": version})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_early_promote_is_refused_with_the_time_left(api: Harness) -> None:
    # given a rollout that has waited 10 minutes of its 30
    await start(api)
    api.clock.advance(minutes=10)

    # when an operator promotes
    response = await api.post("/canary/promote", {"service": "checkout"})

    # then 409 names the 20 minutes left, and nothing moved
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert "20m left" in problem["detail"]
    assert problem["time_left"] == "20m"
    assert problem["reason_code"] == "not_ready"
    assert (await api.get("/canary/checkout")).json()["desired_weight"] == 10
    [refused] = await api.audit_events(outcome="conflict")
    assert refused.action == "canary.promote"
    assert refused.service == "checkout"


async def test_promote_after_the_wait_advances_to_25(api: Harness) -> None:
    await start(api)
    api.clock.advance(minutes=30)

    response = await api.post("/canary/promote", {"service": "checkout"})

    assert response.status_code == 200, response.text
    rollout = response.json()
    assert rollout["desired_weight"] == 25
    assert rollout["step_index"] == 1
    assert rollout["state"] == "progressing"
    assert rollout["time_left"] == "15m"


async def test_repeated_promote_with_the_same_from_percent_advances_once(api: Harness) -> None:
    # given a ready step at 10 %
    await start(api)
    api.clock.advance(minutes=30)
    body = {"service": "checkout", "from_percent": 10}

    # when the same promote is sent twice (a double click)
    first = await api.post("/canary/promote", body)
    api.clock.advance(minutes=15)  # even with the next step's wait over
    second = await api.post("/canary/promote", body)

    # then the rollout advanced once
    assert first.status_code == 200
    assert second.status_code == 409
    assert second.json()["reason_code"] == "stale"
    assert (await api.get("/canary/checkout")).json()["desired_weight"] == 25


async def test_rollback_sets_weight_zero_and_rolled_back(api: Harness) -> None:
    await start(api)
    api.clock.advance(minutes=30)
    await api.post("/canary/promote", {"service": "checkout"})

    response = await api.post("/canary/rollback", {"service": "checkout", "reason": "p99 spike"})

    assert response.status_code == 200, response.text
    rollout = response.json()
    assert rollout["state"] == "rolled_back"
    assert (rollout["desired_weight"], rollout["applied_weight"]) == (0, None)
    # no pull client has fetched the 0 % yet: traffic is not known to be at zero
    assert rollout["traffic_at_zero"] is False
    assert rollout["reason"] == "p99 spike"
    assert (await api.get("/canary/checkout/weight")).json()["weight"] == 0
    view = await api.fetch_weight("checkout")
    assert (view["applied_weight"], view["traffic_at_zero"]) == (0, True)
    [event] = await api.audit_events(action="canary.rollback")
    assert event.outcome == "success"
    assert event.details["reason"] == "p99 spike"
    assert event.details["from_weight"] == 25


async def test_rollback_of_a_finished_rollout_is_409_and_audited(api_any_db: Harness) -> None:
    api = api_any_db
    await start(api)
    await api.post("/canary/rollback", {"service": "checkout", "reason": "first"})

    again = await api.post("/canary/rollback", {"service": "checkout", "reason": "again"})

    assert again.status_code == 409
    assert again.json()["reason_code"] == "terminal"
    events = await api.audit_events(action="canary.rollback")
    assert [e.outcome for e in events] == ["success", "conflict"]
    assert events[1].rollout_id == events[0].rollout_id
    assert (await api.get("/canary/checkout")).json()["reason"] == "first"


async def test_rollback_without_any_rollout_is_404(api: Harness) -> None:
    response = await api.post("/canary/rollback", {"service": "nothing", "reason": "x"})
    assert response.status_code == 404
    [event] = await api.audit_events(action="canary.rollback")
    assert event.outcome == "error"


async def test_pause_freezes_the_wait_clock(api_any_db: Harness) -> None:
    api = api_any_db
    # given a rollout 10 minutes into its 30-minute wait, paused for an hour
    await start(api)
    api.clock.advance(minutes=10)
    paused = await api.post("/canary/pause", {"service": "checkout", "reason": "lunch"})
    assert paused.status_code == 200
    assert paused.json()["state"] == "paused"
    api.clock.advance(hours=1)
    await api.tick()
    assert (await api.get("/canary/checkout")).json()["state"] == "paused"

    # when it resumes
    resumed = await api.post("/canary/resume", {"service": "checkout"})

    # then 20 minutes are still left: the paused hour did not count
    assert resumed.status_code == 200
    assert resumed.json()["state"] == "progressing"
    assert resumed.json()["time_left"] == "20m"
    assert resumed.json()["paused_for"] == "1h"
    refused = await api.post("/canary/promote", {"service": "checkout"})
    assert refused.status_code == 409
    api.clock.advance(minutes=20)
    assert (await api.post("/canary/promote", {"service": "checkout"})).status_code == 200


async def test_promote_while_paused_is_refused(api: Harness) -> None:
    await start(api)
    await api.post("/canary/pause", {"service": "checkout"})
    api.clock.advance(hours=1)

    response = await api.post("/canary/promote", {"service": "checkout"})

    assert response.status_code == 409
    assert response.json()["reason_code"] == "paused"
    assert (await api.post("/canary/pause", {"service": "checkout"})).status_code == 409


async def test_controller_moves_a_ready_step_to_awaiting_promotion(api: Harness) -> None:
    await start(api)
    api.clock.advance(minutes=29)
    await api.tick()
    assert (await api.get("/canary/checkout")).json()["state"] == "progressing"

    api.clock.advance(minutes=1)
    await api.tick()

    rollout = (await api.get("/canary/checkout")).json()
    assert rollout["state"] == "awaiting_promotion"
    assert rollout["ready"] is True
    assert rollout["triggered_by"] == "controller"
    [event] = await api.audit_events(source="controller")
    assert event.action == "rollout.ready"
    assert event.actor == "controller"


async def test_full_rollout_with_auto_promote_succeeds_and_sets_stable(api_any_db: Harness) -> None:
    api = api_any_db
    # given a policy with short waits and auto_promote
    policy = {
        "steps": [{"weight": w, "wait": "1m"} for w in (10, 25, 50, 75)]
        + [{"weight": 100, "wait": "5m"}],
        "auto_promote": True,
    }
    assert (await api.put("/services/checkout", policy)).status_code == 200
    await start(api, version="v2")

    # when the controller runs as time passes
    weights = []
    for _ in range(12):
        api.clock.advance(minutes=1)
        await api.tick()
        weights.append((await api.get("/canary/checkout")).json()["desired_weight"])

    # then it climbed every step once, baked and succeeded; v2 is the new stable
    assert weights[:4] == [25, 50, 75, 100]
    rollout = (await api.get("/canary/checkout")).json()
    assert rollout["state"] == "succeeded"
    assert rollout["stable_version"] == "v2"
    actions = [e.action for e in await api.audit_events(source="controller")]
    assert actions == ["rollout.promoted"] * 4 + ["rollout.succeeded"]
    # and the next rollout starts from the new stable version
    nxt = await start(api, version="v3")
    assert nxt["stable_version"] == "v2"


async def test_force_and_target_percent_are_admin_only_and_audited(api: Harness) -> None:
    await start(api)

    as_operator = await api.post("/canary/promote", {"service": "checkout", "force": True})
    forced = await api.post("/canary/promote", {"service": "checkout", "force": True}, "admin")
    jumped = await api.post(
        "/canary/promote", {"service": "checkout", "force": True, "target_percent": 75}, "admin"
    )

    assert as_operator.status_code == 403
    assert forced.status_code == 200
    assert forced.json()["desired_weight"] == 25
    assert jumped.status_code == 200
    assert jumped.json()["desired_weight"] == 75
    events = await api.audit_events(outcome="success")
    by_action = {e.action: e for e in events}
    assert by_action["canary.promote.force"].details["forced"] is True
    assert by_action["canary.promote.target"].details["target_percent"] == 75
    assert by_action["canary.promote.target"].details["jumped"] is True
    [denied] = await api.audit_events(outcome="denied")
    assert denied.action == "canary.promote.force"


async def test_a_second_version_while_one_is_open_is_refused(api: Harness) -> None:
    await start(api, version="v2")
    response = await api.post("/canary/promote", {"service": "checkout", "version": "v3"})
    assert response.status_code == 409
    assert "v2" in response.json()["detail"]
    assert len(await api.rollouts("checkout")) == 1


async def test_promote_without_version_and_no_rollout_is_refused(api: Harness) -> None:
    response = await api.post("/canary/promote", {"service": "checkout"})
    assert response.status_code == 409
    assert await api.rollouts("checkout") == []


async def test_history_pages_newest_first(api: Harness) -> None:
    for version in ("v1", "v2", "v3"):
        await start(api, version=version)
        await api.post("/canary/rollback", {"service": "checkout", "reason": "test"})

    first = (await api.get("/canary/checkout/history?limit=2")).json()
    second = (
        await api.get(f"/canary/checkout/history?limit=2&cursor={first['next_cursor']}")
    ).json()

    versions = [r["canary_version"] for r in first["items"] + second["items"]]
    assert versions == ["v3", "v2", "v1"]
    assert second["next_cursor"] is None


async def test_list_shows_open_rollouts_only(api: Harness) -> None:
    await start(api, service="a")
    await start(api, service="b")
    await api.post("/canary/rollback", {"service": "a", "reason": "x"})

    items = (await api.get("/canary")).json()["items"]

    assert [r["service"] for r in items] == ["b"]


async def test_the_status_of_a_service_without_a_rollout_is_404(api_any_db: Harness) -> None:
    # given one service never seen and one with a policy but no rollout yet
    policy = {"steps": [{"weight": 50, "wait": "1m"}, {"weight": 100, "wait": "1m"}]}
    assert (await api_any_db.put("/services/configured", policy)).status_code == 200

    for name in ("never-seen", "configured"):
        # when a viewer asks for its status
        response = await api_any_db.get(f"/canary/{name}")
        # then the answer is a 404 problem that says so
        assert response.status_code == 404, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["detail"] == f"{name} has no rollout"


async def test_the_status_shows_the_rollout_its_alerts_and_what_holds_the_service(
    api_any_db: Harness,
) -> None:
    # given a rollout, then a freeze window on its service
    await start(api_any_db)
    window = {"name": "xmas", "services": ["checkout"], "reason": "code freeze",
              "starts_at": "2026-11-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z"}  # fmt: skip
    created = await api_any_db.post("/freezes", window, role="admin")
    assert created.status_code == 201, created.text

    # when a viewer asks for the status
    status = (await api_any_db.get("/canary/checkout")).json()

    # then it shows the rollout as started, and the freeze that holds its promotions
    assert (status["service"], status["canary_version"], status["desired_weight"]) == (
        "checkout", "v2", 10)  # fmt: skip
    assert [hold["kind"] for hold in status["holds"]] == ["frozen"]
    assert "code freeze" in status["holds"][0]["detail"]
    assert status["alerts"] == []
    assert status["notifications"] == []


async def test_every_write_answers_the_rollout_as_a_status_read_then_shows_it(
    api_any_db: Harness,
) -> None:
    """A write's answer is built from the transition it made (not read back): through a
    service's life, each answer is the document a status read shows at that moment."""
    api = api_any_db
    promote = ("/canary/promote", {"service": "checkout"}, 121)  # past any step's wait
    # given a service released twice: v2 paused, resumed, promoted to success; v3 rolled back,
    # released again to success and reverted (None: promote until the controller finishes it)
    life: list[tuple[str, dict[str, object], int] | None] = [
        ("/canary/promote", {"service": "checkout", "version": "v2"}, 0),
        ("/canary/pause", {"service": "checkout"}, 5),
        ("/canary/resume", {"service": "checkout"}, 7),
        None,
        ("/canary/promote", {"service": "checkout", "version": "v3"}, 1),
        ("/canary/rollback", {"service": "checkout", "reason": "5xx"}, 2),
        ("/canary/promote", {"service": "checkout", "version": "v3"}, 1),
        None,
        ("/canary/revert", {"service": "checkout", "reason": "slow"}, 3),
    ]
    states = []
    for write in life:
        while True:
            path, body, minutes = write or promote
            api.clock.advance(minutes=minutes)
            await api.tick()
            status = (await api.get("/canary/checkout")).json()
            if write is None and status["state"] == "succeeded":
                break
            # when the write is made
            answer = await api.post(path, body, role="admin")
            assert answer.status_code == 200, (path, body, answer.text)

            # then a status read at the same instant shows the same rollout
            shown = await api.get("/canary/checkout")
            assert shown.status_code == 200
            written = answer.json()
            assert written == shown.json(), (path, body)
            states.append(written["state"])
            if write is not None:
                break
    assert states.count("rolled_back") == 1, states
    assert states[-1] == "reverted", states
    assert states.count("progressing") >= 8, states
