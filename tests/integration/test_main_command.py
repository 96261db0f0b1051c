"""The README's main command, as shipped: `make atlas` (every family at its defaults on the embedded
SmolLM2, on Ray, then `atlas roles`). Every unit must complete and every stored number be finite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FAMILIES = {"patterns", "lens", "ablation", "pursuit", "retrieval", "circuits", "examples"}


def _main_command(db: Path) -> subprocess.CompletedProcess[str]:
    """`make atlas` itself when this interpreter is the Makefile's venv (CI); else the same two commands."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() == venv.resolve() and (venv / ".installed").exists():
        command = ["make", "--no-print-directory", "atlas", f"DB={db}"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    atlas = str(Path(sys.executable).parent / "atlas")
    built = subprocess.run([atlas, "build", "--model", "llama", "--families", "all", "--db", str(db)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=3600)
    if built.returncode:
        return built
    roles = subprocess.run([atlas, "roles", "--model", "llama", "--db", str(db)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    return subprocess.CompletedProcess(roles.args, roles.returncode, built.stdout + roles.stdout,
                                       built.stderr + roles.stderr)


@pytest.mark.slow
@pytest.mark.ray
def test_make_atlas_builds_every_family_at_its_defaults(tmp_path: Path) -> None:
    from atlas.store import Atlas

    db = tmp_path / "atlas.duckdb"
    t0 = time.perf_counter()
    done = _main_command(db)
    wall = time.perf_counter() - t0
    print(f"main command: exit {done.returncode} in {wall:.0f} s\n{done.stderr[-4000:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "induction" in done.stdout  # the roles table
    if done.args[0] == "make":
        assert "Where to look next" in done.stdout
    with Atlas(db, read_only=True) as atlas:
        runs = atlas.query("SELECT family, status, seconds FROM runs").to_pylist()
        assert {r["family"] for r in runs} == FAMILIES and all(r["status"] == "complete" for r in runs), runs
        print({r["family"]: round(r["seconds"], 1) for r in runs})
        numbers = {
            "head_metrics": ["value", "stderr"], "head_tokens": ["score"], "concept_scores": ["score"],
            "edits": ["before", "after"], "run_metrics": ["value"], "head_examples": ["score"],
        }
        for table, columns in numbers.items():
            for column in columns:
                bad = atlas.query(f"SELECT count(*) AS n FROM {table} WHERE isnan({column}) OR isinf({column})")
                assert bad.to_pylist()[0]["n"] == 0, f"non-finite {table}.{column}"
        per_family = {r["family"]: r["n"] for r in atlas.query(
            "SELECT r.family, count(*) AS n FROM head_metrics m JOIN runs r USING (run_id) GROUP BY 1").to_pylist()}
        assert set(per_family) >= FAMILIES - {"examples"}, per_family  # every family stored per-head numbers
        n_heads = 30 * 9
        examples = atlas.query("SELECT count(DISTINCT (layer, head)) AS heads, count(*) AS n FROM head_examples")
        assert examples.to_pylist() == [{"heads": n_heads, "n": n_heads * 2 * 5}]  # 2 criteria x top 5
        concept_rows = atlas.query("SELECT count(*) AS n FROM head_metrics WHERE metric LIKE 'ablation.concept.%' "
                                   "AND n = 2").to_pylist()[0]["n"]
        assert concept_rows >= n_heads * 10, "concept effects are over each concept's own 2 prompts"
