"""The demo app as the gates see it: series appear only once recorded, a deploy starts a
version with no series, faults set through the control file show up in answers and metrics.
And the prerequisite check, table-driven."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opsapi.demo.app import Behaviour, DemoApp, make_server, sample, write_control
from opsapi.demo.stack import Binaries, DemoError, find_binaries


@pytest.fixture
def slot(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The demo app serving slot `blue` of `checkout` with v1, and its control file."""
    control = tmp_path / "blue.json"
    write_control(control, version="v1")
    app = DemoApp("checkout", Behaviour(), slot="blue", control=control)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", control
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def series(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    text = httpx.get(f"{url}/metrics", trust_env=False).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_by_code(url: str) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["version"], dict(labels)["code"]): value
        for (name, labels), value in series(url).items()
        if name == "http_requests_total"
    }


def test_series_exist_only_once_recorded_and_a_deploy_starts_without_any(
    slot: tuple[str, Path],
) -> None:
    url, control = slot
    # given a healthy v1 that has served nothing yet: no series at all
    assert requests_by_code(url) == {}
    # when it serves 20 requests
    answers = sample(url + "/", 20)
    # then each answer names slot and version, and only the 200 series exists
    assert answers == {"blue v1": 20}
    assert requests_by_code(url) == {("v1", "200"): 20}
    duration = series(url)[("http_request_duration_seconds_count",
                            (("service", "checkout"), ("version", "v1")))]  # fmt: skip
    assert duration == 20

    # when v2 is deployed, told to fail every request
    write_control(control, version="v2", error_ratio=1.0)
    # then v1's series are gone (a new process would not have them) and v2 has none yet
    assert requests_by_code(url) == {}
    # and its answers are 500s, recorded as such, with no 200 series
    assert sample(url + "/", 5) == {"blue v2 failed": 5}
    assert requests_by_code(url) == {("v2", "500"): 5}

    # when the fault is lifted (same version)
    write_control(control, version="v2", error_ratio=0.0)
    sample(url + "/", 3)
    # then the series carry on
    assert requests_by_code(url) == {("v2", "500"): 5, ("v2", "200"): 3}


def test_nothing_deployed_answers_503_and_records_nothing(slot: tuple[str, Path]) -> None:
    url, control = slot
    write_control(control, version=None)
    assert sample(url + "/", 3) == {"blue nothing deployed": 3}
    assert requests_by_code(url) == {}


@pytest.mark.parametrize(
    "document",
    [
        '{"version": "", "error_ratio": 0}',
        '{"version": "v9", "error_ratio": 1.5}',
        '{"version": "v9", "latency_seconds": -1}',
        '{"version": "v9", "colour": "red"}',
        '["v9"]',
        "not json",
    ],
)
def test_a_bad_control_file_keeps_what_runs(slot: tuple[str, Path], document: str) -> None:
    url, control = slot
    control.write_text(document)
    assert sample(url + "/", 2) == {"blue v1": 2}


def _program(directory: Path, name: str) -> None:
    directory.mkdir(exist_ok=True)
    program = directory / name
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)


@pytest.mark.parametrize(
    ("on_path", "in_sbin", "missing"),
    [
        (["prometheus", "nginx"], [], None),
        (["prometheus"], ["nginx"], None),
        (["nginx"], [], "prometheus (on PATH) not found: the demo runs a real Prometheus and "
         "nginx; on Debian or Ubuntu install it with `sudo apt-get install prometheus`"),
        (["prometheus"], [], "nginx (on PATH or in {sbin}) not found: the demo runs a real "
         "Prometheus and nginx; on Debian or Ubuntu install it with `sudo apt-get install nginx`"),
        ([], [], "prometheus (on PATH) and nginx (on PATH or in {sbin}) not found: the demo runs a "
         "real Prometheus and nginx; on Debian or Ubuntu install them with "
         "`sudo apt-get install prometheus nginx`"),
    ],
)  # fmt: skip
def test_prerequisites(
    tmp_path: Path, on_path: list[str], in_sbin: list[str], missing: str | None
) -> None:
    path, sbin = tmp_path / "bin", tmp_path / "sbin"
    path.mkdir()
    sbin.mkdir()
    for name in on_path:
        _program(path, name)
    for name in in_sbin:
        _program(sbin, name)
    if missing is None:
        found = find_binaries(str(path), [str(sbin)])
        assert found == Binaries(
            prometheus=str(path / "prometheus"),
            nginx=str((path if "nginx" in on_path else sbin) / "nginx"),
        )
    else:
        with pytest.raises(DemoError) as error:
            find_binaries(str(path), [str(sbin)])
        assert str(error.value) == missing.format(sbin=sbin)
