"""`atlas sweep` files, repeatable corpora, and `atlas status`, on a tiny model in-process."""

from __future__ import annotations

import json
from pathlib import Path

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
