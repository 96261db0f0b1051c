"""`atlas sweep` files, repeatable corpora, and `atlas status`, on a tiny model in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_bad_sweep_files_are_clear(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "a.yaml"
    bad_yaml.write_text("models: [llama\n")
    unknown = tmp_path / "b.yaml"
    unknown.write_text("models: [llama]\nfamilys: all\n")
    for path, message in ((bad_yaml, "not valid YAML"), (unknown, "familys")):
        result = runner.invoke(app, ["sweep", str(path), "--db", str(tmp_path / "x.duckdb")])
        assert result.exit_code == 2 and message in result.stderr
    assert runner.invoke(app, ["sweep", str(tmp_path / "none.yaml")]).exit_code == 3
    assert not (tmp_path / "x.duckdb").exists()


def test_sweep_over_two_corpora_and_status(tiny_dir: Path, tmp_path: Path) -> None:
    corpora = []
    for i in range(2):
        corpora.append(tmp_path / f"c{i}.txt")
        corpora[-1].write_text(" ".join(f"w{(i + j) % 90}" for j in range(300)))
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"models": [str(tiny_dir)], "families": ["patterns"],
                                "corpora": [str(c) for c in corpora], "executor": "local"}))
    db = tmp_path / "s.duckdb"
    result = runner.invoke(app, ["sweep", str(spec), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["planned"] == 1  # patterns reads no corpus: one unit, not two
    status = json.loads(runner.invoke(app, ["status", "--db", str(db), "--json"]).stdout)
    assert status["counts"]["complete"] == 1 and status["live"] is False
    assert runner.invoke(app, ["status", "--db", str(tmp_path / "never.duckdb")]).exit_code == 3


def test_a_sweep_of_several_builds_runs_each(tiny_dir: Path, tmp_path: Path) -> None:
    """`builds:` lists BuildRequests (the body of POST /api/builds); each runs into the one atlas."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"executor": "local", "builds": [
        {"models": [str(tiny_dir)], "families": ["patterns"], "options": {"probe_n": 3}},
        {"models": [str(tiny_dir)], "families": "patterns", "seed": 1, "options": {"probe_n": 4}}]}))
    db = tmp_path / "s.duckdb"
    result = runner.invoke(app, ["sweep", str(spec), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["planned"] == summary["completed"] == 2 and not summary["failed"]


@pytest.mark.parametrize(("builds", "message"), [
    ([{"models": ["llama"], "families": ["patterns"]},
      {"models": ["llama"], "families": ["pursuit"], "options": {"n_randon": 3}}],
     "builds entry 2: no family in this build (pursuit) reads the option 'n_randon'"),
    ([{"models": ["llama"], "families": ["patterns"]},
      {"models": ["llama"], "families": ["pursuit"], "verify": "huge"}],
     "builds entry 2: option 'verify' = 'huge' is not one of small, standard, full, off"),
    ([{"models": ["llama"], "families": ["pursuit"], "verify": "off", "options": {"verify": "full"}}],
     "builds entry 1: option 'verify' is given twice"),
    ([{"models": ["llama"], "familys": ["patterns"]}], "builds entry 1: familys: Extra inputs are not permitted"),
    ([{"models": ["llama"]}, "patterns"], "builds entry 2: expected a mapping of build fields"),
    ([], "builds: must be a non-empty list"),
])
def test_every_sweep_entry_is_checked_before_any_runs(tiny_dir: Path, tmp_path: Path, builds: list,
                                                      message: str) -> None:
    """A typo in the second entry is refused before the first one builds anything."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"executor": "local", "builds": builds}))
    db = tmp_path / "s.duckdb"
    result = runner.invoke(app, ["sweep", str(spec), "--db", str(db)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not db.exists() and not list(tmp_path.glob("s*shards*")) and not list(tmp_path.glob(".s*"))


@pytest.mark.parametrize(("fields", "message"), [
    ({"models": ["llama"], "families": ["pursuit"], "options": {"n_randon": 3}}, "reads the option 'n_randon'"),
    ({"models": ["llama"], "families": ["pursuit"], "criterion": "l3"}, "option 'criterion' = 'l3'"),
    ({"models": ["llama"], "families": "patterns", "corpora": ["a.txt"], "corpus": "b.txt"},
     "both corpora and corpus are given"),
    ({"models": ["llama"], "families": ["patterns"], "builds": [{"models": ["llama"]}]},
     "models, families given at the top and a builds: list too"),
])
def test_a_one_build_sweep_file_is_checked_the_same(tmp_path: Path, fields: dict, message: str) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"executor": "local", **fields}))
    result = runner.invoke(app, ["sweep", str(spec), "--db", str(tmp_path / "s.duckdb")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and str(spec.name) in result.stderr
    assert not (tmp_path / "s.duckdb").exists()


def test_older_sweep_files_read_as_one_build() -> None:
    from cli.sweep import load_sweep

    spec = load_sweep(Path(__file__).resolve().parents[2] / "docker" / "sweep.yaml")
    (request,) = spec.builds
    assert spec.models == request.models == ["llama", "gemma"]
    assert request.families == ["all"] and request.corpus is None and request.options == {"seed": 0}
    assert spec.ray.address == "ray-head:6379" and spec.device == "auto"
