"""The build path end to end on a tiny model, through the CLI a user types."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from atlas.errors import BadInput
from cli.main import app
from workers.build import build, build_lock

runner = CliRunner()


def _build(tiny_dir: Path, db: Path, *extra: str):
    return runner.invoke(app, ["build", "--model", str(tiny_dir), "--families", "patterns", "--db", str(db),
                               "--executor", "local", "--json", *extra])


def _count(db: Path, table: str = "head_metrics") -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    finally:
        con.close()


def test_build_twice_does_no_work_and_adds_no_rows(tiny_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    first = _build(tiny_dir, db)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["completed"] == 1 and summary["rows"] == 3 * 4 * 10
    rows = _count(db)
    second = _build(tiny_dir, db)
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["skipped"] == 1 and json.loads(second.stdout)["completed"] == 0
    assert _count(db) == rows and _count(db, "runs") == 1
    changed = _build(tiny_dir, db, "--seed", "1")  # a new config is a new run
    assert json.loads(changed.stdout)["completed"] == 1 and _count(db, "runs") == 2


def test_a_replayed_shard_counts_once(tiny_dir: Path, tmp_path: Path) -> None:
    """A shard an interrupted driver wrote but never ingested is ingested by the next build, and the
    summary counts that unit as replayed only: planned = skipped + replayed + completed + failed."""
    from atlas.status import shard_root

    first = tmp_path / "a.duckdb"
    assert _build(tiny_dir, first).exit_code == 0
    fresh = tmp_path / "b.duckdb"  # an atlas whose driver died after the shard was written
    shutil.copytree(shard_root(first), shard_root(fresh))
    result = _build(tiny_dir, fresh)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["planned"], summary["skipped"], summary["replayed"], summary["completed"]) == (1, 0, 1, 0)
    assert _count(fresh) == _count(first) and _count(fresh, "runs") == 1


def test_query_heads_models_commands(tiny_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    assert _build(tiny_dir, db).exit_code == 0
    ranked = runner.invoke(app, ["heads", "--metric", "induction", "--top", "3", "--db", str(db), "--json"])
    assert ranked.exit_code == 0, ranked.output
    rows = json.loads(ranked.stdout)
    assert len(rows) == 3 and rows[0]["value"] >= rows[1]["value"] >= rows[2]["value"]
    assert rows[0]["metric"] == "patterns.induction"
    csv = runner.invoke(app, ["query", "SELECT layer, head FROM heads ORDER BY 1, 2 LIMIT 2", "--db", str(db),
                              "--format", "csv"])
    assert csv.stdout.splitlines() == ["\"layer\",\"head\"", "0,0", "0,1"]
    listed = json.loads(runner.invoke(app, ["models", "--db", str(db), "--json"]).stdout)
    assert listed["models"][0]["n_heads"] == 4 and {a["alias"] for a in listed["aliases"]} >= {"llama", "gemma"}


@pytest.mark.parametrize(("args", "code", "message"), [
    (["build", "--model", "lama"], 3, "unknown model 'lama'"),
    (["build", "--model", "./missing.gguf"], 3, "no model file"),
    (["build", "--model", "llama", "--families", "nope"], 2, "unknown family"),
    (["query", "DELETE FROM runs"], 2, "only read queries"),
    (["heads", "--metric", "nope"], 3, "no metric 'nope'"),
    (["build", "--model", "llama", "--families", "pursuit", "-o", "n_randm=3"], 2, "reads the option 'n_randm'"),
    (["build", "--model", "llama", "--families", "retrieval", "-o", "retrieval_depths=[1]"], 2,
     "option 'retrieval_depths' = [1] is not an integer"),
    (["build", "--model", "llama", "--families", "pursuit", "-o", "steps"], 2, "is not KEY=VALUE"),
    (["build", "--model", "llama", "--families", "pursuit", "--verify", "huge"], 2,
     "option 'verify' = 'huge' is not one of small, standard, full, off"),
    (["build", "--model", "llama", "--families", "pursuit", "--criterion", "l3"], 2, "option 'criterion' = 'l3'"),
    # issue 13: values that used to pass and store NaN "complete" runs or failed runs
    (["build", "--model", "llama", "--families", "patterns", "-o", "probe_n=0"], 2,
     "option 'probe_n' = 0 is out of range: must be >= 2"),
    (["build", "--model", "llama", "--families", "patterns", "-o", "probe_batch=0"], 2, "option 'probe_batch' = 0"),
    (["build", "--model", "llama", "--families", "patterns", "-o", "probe_n=-3"], 2, "option 'probe_n' = -3"),
    (["build", "--model", "llama", "--families", "patterns", "--seed", str(2**70)], 2, "option 'seed'"),
    (["build", "--model", "llama", "--families", "patterns", "-o", "probe_n=2.5"], 2, "is not an integer"),
    (["build", "--model", "llama", "--families", "pursuit", "-o", "k_fractions=[0.01, 2]"], 2,
     "option 'k_fractions'"),
    (["build", "--model", "llama", "--families", "lens", "-o", "lens_windows=NaN"], 2, "option 'lens_windows'"),
    (["build", "--model", "llama", "--families", "ablation", "--ablation", "half"], 2, "option 'ablation' = 'half'"),
    (["build", "--model", "llama", "--families", "retrieval", "--max-context", "100"], 2,
     "option 'max_context' = 100 is out of range"),
])
def test_bad_input_is_clear_and_leaves_the_atlas_unchanged(tiny_dir: Path, tmp_path: Path, args, code,
                                                           message) -> None:
    db = tmp_path / "a.duckdb"
    assert _build(tiny_dir, db).exit_code == 0
    before = db.read_bytes()
    result = runner.invoke(app, [*args, "--db", str(db)])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.split())
    assert db.read_bytes() == before


def test_option_flags_reach_the_family_config(tiny_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    result = runner.invoke(app, ["build", "--model", str(tiny_dir), "--families", "patterns", "--db", str(db),
                                 "--executor", "local", "--json", "-o", "probe_n=3"])
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT config FROM runs WHERE family = 'patterns'").fetchall()
        configs = [json.loads(c) for (c,) in rows]
    finally:
        con.close()
    assert configs and all(c["n"] == 3 for c in configs)


def test_bad_input_creates_no_atlas(tmp_path: Path) -> None:
    db = tmp_path / "new.duckdb"
    assert runner.invoke(app, ["build", "--model", "lama", "--db", str(db)]).exit_code == 3
    assert not db.exists()


def test_second_build_on_a_held_atlas_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    assert _build(tiny_dir, db).exit_code == 0
    before = db.read_bytes()
    with build_lock(db):  # a running build holds this for its whole life
        result = _build(tiny_dir, db, "--seed", "7")
    assert result.exit_code == 4
    assert "another build" in result.stderr
    assert db.read_bytes() == before


def test_a_build_that_fails_inside_the_lock_releases_it(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    db = tmp_path / "a.duckdb"
    with pytest.raises(BadInput, match="could not be loaded"):
        build([str(broken)], ["patterns"], db, executor="local", device="cpu")
    assert not db.exists()
    lock = db.with_name(db.name + ".build.lock")
    with lock.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if still held
