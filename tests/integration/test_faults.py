"""Faults a sweep survives, each with real processes on a local Ray cluster with two workers:
a driver killed with SIGKILL, a worker killed mid-unit, units that raise, readers during ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlas.errors import Busy, NotFound
from atlas.store import Atlas
from tests.tiny import save_tiny

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]
HEADS = 3 * 4  # the tiny model's layers x heads


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    corpora = []
    for i in range(4):
        path = tmp_path / f"corpus{i}.txt"
        path.write_text(" ".join(f"w{(i * 7 + j) % 90}" for j in range(200)))
        corpora.append(path)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "HEAD_ATLAS_FAMILIES": "tests.fault_families", "PYTHONPATH": str(ROOT),
           "FAULT_DIR": str(marks), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    return {"model": save_tiny(tmp_path / "tiny"), "db": tmp_path / "sweep.duckdb", "corpora": corpora,
            "marks": marks, "env": env}


def _command(s: dict, families: str, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "cli", "build", "--model", str(s["model"]), "--families", families,
            "--db", str(s["db"]), "--json", *extra]
    for corpus in s["corpora"]:
        args += ["--corpus", str(corpus)]
    return args


def _run(s: dict, families: str, *extra: str, env: dict | None = None) -> tuple[int, dict]:
    done = subprocess.run(_command(s, families, *extra), env=env or s["env"], capture_output=True, text=True,
                          timeout=600)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}


def _rows(db: Path) -> tuple[int, int, int]:
    with Atlas(db) as atlas:
        row = atlas.query("SELECT count(*) AS n, count(DISTINCT (run_id, layer, head, metric)) AS d, "
                          "count(DISTINCT run_id) AS runs FROM head_metrics").to_pylist()[0]
    return row["n"], row["d"], row["runs"]


def _units(db: Path) -> dict[str, str]:
    status = json.loads((db.with_name(db.stem + "_shards") / "_build.json").read_text())
    return {u["run_id"]: u["state"] for u in status["units"]}


def test_driver_killed_mid_build_resumes_without_duplicates(setup: dict) -> None:
    env = {**setup["env"], "FAULT_SLEEP_S": "3"}
    driver = subprocess.Popen(_command(setup, "sleepy"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            if list(_units(setup["db"]).values()).count("complete") >= 1:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    else:
        pytest.fail("the build never finished a unit")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    driver.wait()
    before = _units(setup["db"])
    assert 1 <= list(before.values()).count("complete") < 4
    code, summary = _run(setup, "sleepy", env={**setup["env"], "FAULT_SLEEP_S": "0"})
    assert code == 0, summary
    assert summary["skipped"] + summary["replayed"] + summary["completed"] == 4
    assert summary["skipped"] >= 1  # finished units were not recomputed
    rows, distinct, runs = _rows(setup["db"])
    assert (rows, distinct, runs) == (4 * HEADS, 4 * HEADS, 4)


def test_worker_killed_mid_unit_is_retried_on_a_new_actor(setup: dict) -> None:
    setup["corpora"] = setup["corpora"][:2]
    env = {**setup["env"], "FAULT_SLEEP_S": "4"}
    driver = subprocess.Popen(_command(setup, "sleepy"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline:
        time.sleep(0.2)
        for mark in setup["marks"].iterdir():
            pid = int(mark.name.split(".")[1])
            os.kill(pid, signal.SIGKILL)  # the Ray worker process running this unit
            killed = (mark.name.split(".")[0], pid)
            break
    assert killed, "no unit started"
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err
    assert out.strip().startswith("{"), out[:2000]
    summary = json.loads(out)
    assert summary["completed"] == 2 and not summary["failed"]
    attempts = [m.name for m in setup["marks"].iterdir() if m.name.startswith(killed[0])]
    pids = {int(name.split(".")[1]) for name in attempts}
    assert len(attempts) >= 2 and len(pids) >= 2 and killed[1] in pids  # rerun on another process
    assert _rows(setup["db"]) == (2 * HEADS, 2 * HEADS, 2)


def test_units_that_raise_are_retried_smaller_then_marked_failed(setup: dict) -> None:
    setup["corpora"] = setup["corpora"][:1]
    code, summary = _run(setup, "sleepy,flaky,broken", env={**setup["env"], "FAULT_SLEEP_S": "0"})
    assert code == 1
    assert summary["completed"] == 2 and len(summary["failed"]) == 1
    (failed_id, error), = summary["failed"].items()
    assert failed_id.startswith("broken-") and "simulated failure" in error and "attempt 3" in error
    with Atlas(setup["db"]) as atlas:
        runs = {r["family"]: r for r in atlas.query("SELECT family, status, config FROM runs").to_pylist()}
    assert runs["broken"]["status"] == "failed"
    flaky = json.loads(runs["flaky"]["config"])
    assert runs["flaky"]["status"] == "complete" and flaky["attempts"] == 2 and flaky["batch_divisor"] == 2
    status = subprocess.run([sys.executable, "-m", "cli", "status", "--db", str(setup["db"]), "--json"],
                            env=setup["env"], capture_output=True, text=True, check=True)
    units = {u["family"]: u for u in json.loads(status.stdout)["units"]}
    assert units["broken"]["state"] == "failed" and "simulated failure" in units["broken"]["error"]
    code, again = _run(setup, "sleepy,flaky,broken", env={**setup["env"], "FAULT_SLEEP_S": "0"})
    assert code == 1 and again["skipped"] == 2 and list(again["failed"]) == [failed_id]  # retried


def test_readers_during_a_build_get_answers_or_a_clear_busy(setup: dict) -> None:
    env = {**setup["env"], "FAULT_SLEEP_S": "1"}
    driver = subprocess.Popen(_command(setup, "sleepy"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    answers, busy = [], 0
    while driver.poll() is None:
        try:
            with Atlas(setup["db"], wait_s=2) as atlas:
                row = atlas.query("SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM head_metrics")
                answers.append(row.to_pylist()[0])
        except NotFound:
            pass  # not created yet
        except Busy:
            busy += 1
        time.sleep(0.05)
    assert driver.returncode == 0
    with Atlas(setup["db"]) as atlas:
        answers.append(atlas.query("SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM head_metrics")
                       .to_pylist()[0])
    assert answers, "no reader ever got in"
    assert all(a["n"] == a["runs"] * HEADS for a in answers)  # never a half-ingested unit
    assert answers[-1]["runs"] == 4
    print(f"{len(answers)} answers, {busy} busy during the build")
