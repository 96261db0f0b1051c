"""Helpers for the server tests: tiny atlases built through the real build path, a real
`atlas serve` subprocess on a free loopback port. (No tests here.)"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from atlas.shards import write_shard
from atlas.store import Atlas
from tests.seed import run_record


def build_tiny_atlas(db: Path, model_dirs: list[Path]) -> None:
    """The patterns family over tiny random models, in-process (the CLI's --executor local path)."""
    from workers.build import build

    report = build([str(d) for d in model_dirs], ["patterns"], db, device="cpu", executor="local")
    assert not report.failed, report.failed


def add_concept_run(db: Path, concepts: tuple[str, ...] = ("colors", "numbers"), seed: int = 0) -> None:
    """Concept scores for every head of every model, ingested through a real shard.

    The scores are seeded random numbers, not a pursuit run: the pages and API are under test
    here, and they must show whatever the atlas holds.
    """
    rng = random.Random(seed)
    with Atlas.writer(db) as atlas:
        models = atlas.execute("SELECT * FROM models").to_pylist()
        for m in models:
            run_id = f"fixture-concepts-{m['model_key'][:40]}-{seed}"
            run = run_record(run_id, m["model_key"], "fixture", datetime.now(UTC).isoformat(),
                             probe_set="seeded-random", config={"seed": seed}, config_hash=str(seed), device="cpu",
                             tokens=0, seconds=0.0)
            scores = []
            for concept in concepts:
                values = [(rng.random(), layer, head) for layer in range(m["n_layers"])
                          for head in range(m["n_heads"])]
                for rank, (score, layer, head) in enumerate(sorted(values, reverse=True), start=1):
                    scores.append({"layer": layer, "head": head, "concept": concept, "score": score,
                                   "rank": rank})
            words = [{"name": c, "words": f'["{c}-a", "{c}-b"]', "source": "test"} for c in concepts]
            model = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in m.items()}
            shard = write_shard(db.with_name(db.stem + "_fixture_shards"), run, model,
                                {"concept_scores": scores, "concepts": words})
            atlas.ingest(shard)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """The URL of a server started by `serve`, with the server's process id (for its RSS)."""

    pid: int


@contextmanager
def serve(db: Path, *args: str, log: Path | None = None, wait_s: float = 90.0,
          env: dict[str, str] | None = None) -> Iterator[ServerURL]:
    """`atlas serve` in a subprocess on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    log = log or db.with_suffix(".serve.log")
    cmd = [sys.executable, "-c", "from cli.main import main; main()", "serve", "--db", str(db),
           "--port", str(port), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[2])
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"atlas serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"atlas serve did not come up in {wait_s}s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_build(client: httpx.Client, build_id: str, timeout_s: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/api/builds/{build_id}").json()
        if state["status"] in ("complete", "failed"):
            return state
        time.sleep(0.3)
    raise TimeoutError(f"build {build_id} still {state['status']} after {timeout_s}s")
