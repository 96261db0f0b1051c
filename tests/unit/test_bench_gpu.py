"""bench/bench_gpu.py runs on a CPU with a small config, every family through the local executor."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"
SMALL = ["probe_n=8", "probe_batch=4", "lens_windows=2", "lens_window=32", "ablation_windows=1",
         "ablation_window=16", "ablation_ioi_prompts=2", "ablation_induction_batch=2", "verify=off", "steps=3",
         "max_context=256", "retrieval_depths=2", "retrieval_max_new_tokens=3", "retrieval_mask_tests=1",
         "concept_prompts=1", "samples_per_concept=2", "examples_windows=2", "examples_window=32"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, families: str) -> tuple[list[dict], Path]:
    out = tmp_path / "rows.json"
    args = ["--configs", "tiny", "--layers", "3", "--device", "cpu", "--families", families, "--json", str(out)]
    from workers.families import get_family
    from workers.plan import family_names

    known = {o.name for f in family_names(families) for o in get_family(f).options}
    for pair in SMALL:
        if pair.partition("=")[0] in known:
            args += ["-o", pair]
    return _bench().main(args), out


def test_patterns_lens_and_retrieval_run_on_a_small_random_config_on_cpu(tmp_path) -> None:
    rows, out = _run(tmp_path, "patterns,lens,retrieval")
    assert [r["family"] for r in rows] == ["patterns", "lens", "retrieval"]
    for row in rows:
        assert row["ok"], row["error"]
        assert (row["layers"], row["of"]) == (3, 4)  # three of the config's four blocks built
        assert row["seconds"] > 0 and row["tokens"] > 0 and row["vs_plain_forward"] > 0
        # the whole model (4 blocks) costs more than the 2 that ran; paper-grade sizes more than the defaults
        assert row["full_atlas_default_s"] > 0 and row["full_atlas_paper_s"] > 0
    by_family = {r["family"]: r for r in rows}
    assert by_family["patterns"]["full_atlas_paper_s"] > by_family["patterns"]["seconds"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows, default=str))


@pytest.mark.slow
def test_every_family_runs_on_a_small_random_config_on_cpu(tmp_path) -> None:
    rows, _ = _run(tmp_path, "all")
    assert [r["family"] for r in rows] == ["patterns", "lens", "ablation", "pursuit", "retrieval", "circuits",
                                           "examples"]
    assert all(r["ok"] for r in rows), [r["error"] for r in rows]
    by_family = {r["family"]: r for r in rows}
    assert by_family["circuits"]["tokens"] == 0 and by_family["circuits"]["vs_plain_forward"] is None
    assert by_family["examples"]["vs_plain_forward"] > 0


def test_the_real_configs_have_the_published_sizes() -> None:
    from workers.batching import Shape

    bench = _bench()
    params = {name: Shape.from_config(config).params / 1e9 for name, config in bench.CONFIGS.items()}
    assert params["llama-3.1-8b"] == pytest.approx(8.03, rel=0.01)
    assert params["qwen2.5-7b"] == pytest.approx(7.6, rel=0.02)  # biases on q/k/v left out (0.01%)
    assert params["gemma-2-9b"] == pytest.approx(9.24, rel=0.01)
    assert params["mistral-7b"] == pytest.approx(7.25, rel=0.01)
    assert params["llama-3.3-70b"] == pytest.approx(70.6, rel=0.01)
    assert params["llama-3.2-1b"] == pytest.approx(1.24, rel=0.01)


def test_unknown_config_is_refused() -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--configs", "gpt-5", "--device", "cpu"])
