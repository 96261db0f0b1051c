"""The read commands start light (issue 20): they import no torch, Ray or transformers (the model side),
and `atlas --help` imports neither DuckDB, SQLAlchemy nor pydantic. Each command runs in a fresh
interpreter, as a user's shell runs it, and reports what it imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MODEL_SIDE = ("torch", "ray", "transformers", "gguf", "accelerate")
PROBE = """
import json, sys
from cli.main import main
sys.argv = ["atlas", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print("\\n" + json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def loaded(*args: str) -> tuple[int, set[str], str]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"]), done.stdout + done.stderr


def read_commands(db: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "query": ["query", "SELECT count(*) AS n FROM head_roles", "--db", str(db)],
        "heads": ["heads", "--metric", "induction", "--top", "2", "--db", str(db)],
        "show": ["show", "alpha", "1.2", "--db", str(db)],
        "models": ["models", "--db", str(db)],
        "roles": ["roles", "--db", str(db)],
        "compare": ["compare", "alpha", "beta", "--out", str(tmp / "report.html"), "--db", str(db)],
    }


@pytest.mark.parametrize("command", ["query", "heads", "show", "models", "roles", "compare"])
def test_read_commands_import_no_model_code(command: str, seeded_atlas: Path, tmp_path: Path) -> None:
    code, modules, output = loaded(*read_commands(seeded_atlas, tmp_path)[command])
    assert code == 0, output
    assert not modules & set(MODEL_SIDE), f"atlas {command} imported {sorted(modules & set(MODEL_SIDE))}"
    if command != "compare":  # plain SQL over the derived tables, Arrow from DuckDB: no query builder,
        assert not modules & {"sqlalchemy", "pandas"}, output  # no pandas (Arrow from Python values loads it)


def test_help_imports_no_database_code() -> None:
    code, modules, output = loaded("--help")
    assert code == 0 and "query" in output
    assert not modules & {*MODEL_SIDE, "duckdb", "sqlalchemy", "pydantic", "yaml"}, sorted(modules)


def test_models_lists_the_aliases_without_the_loaders(tmp_path: Path) -> None:
    code, modules, output = loaded("models", "--db", str(tmp_path / "none.duckdb"), "--json")
    assert code == 0, output
    listed = json.loads(output[:output.rindex("\n{")])["aliases"]
    assert {"llama", "gemma", "qwen"} <= {entry["alias"] for entry in listed}
    assert "workers" not in modules
