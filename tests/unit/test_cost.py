"""The cost model (workers/cost.py) and `atlas plan`: counts that match what the families run, prices, configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas.errors import BadInput
from workers import cost
from workers.batching import Shape, model_shape
from workers.families import FAMILIES, get_family

runner = CliRunner()

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64}


def _config(family: str, **options) -> dict:
    from workers.options import validate

    f = get_family(family)
    return f.config(validate([f], options))


def _forwards(lm, monkeypatch) -> list[tuple[int, int]]:
    """Record (batch, length) of every forward of the model."""
    seen: list[tuple[int, int]] = []
    real = lm.model.forward

    def spy(*args, **kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        seen.append(tuple(ids.shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", spy)
    return seen


@pytest.mark.parametrize("memory", ["1", str(2**40)])
def test_patterns_and_lens_counts_match_the_forwards_they_run(tiny_lm, monkeypatch, memory) -> None:
    """Forwards and tokens the cost model counts are what the families do, at the minibatch the free memory
    allows (1 byte: one sequence per forward; a lot: lens_batch / the whole probe set)."""
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
    shape = model_shape(tiny_lm.model)
    room = int(memory) * 0.5
    for family, options in (("patterns", {"probe_n": 6, "probe_batch": 5}),
                            ("lens", {"lens_window": 16, "lens_windows": 5, "lens_batch": 3})):
        config = _config(family, **options)
        seen = _forwards(tiny_lm, monkeypatch)
        result = get_family(family).run(tiny_lm, config)
        monkeypatch.undo()
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
        work = cost.WORK[family](shape, config, room, 4)
        assert work.forwards == len(seen), family
        assert work.forward_tokens == sum(b * t for b, t in seen) == result.tokens
        assert work.batch == max(b for b, _ in seen)


@pytest.mark.parametrize("memory", ["1", str(2**40)])
def test_pursuit_and_ablation_minibatches_match_the_families(tiny_lm, monkeypatch, memory, tmp_path) -> None:
    """Pursuit's pooling forwards and ablation's heads per stacked forward are what the cost model counts at
    the same free memory (1 byte: one at a time; a lot: everything the option or the layer allows)."""
    from tests.unit.test_pursuit import TINY_CONCEPTS
    from workers.families.ablation import AblationFamily
    from workers.families.ablation.exact import heads_per_forward

    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
    shape, room = model_shape(tiny_lm.model), int(memory) * 0.5
    concepts = tmp_path / "tiny.toml"
    concepts.write_text(TINY_CONCEPTS)
    config = _config("pursuit", concepts=str(concepts), verify="off", steps=3, readout_candidates=16, batch=3)
    seen = _forwards(tiny_lm, monkeypatch)
    get_family("pursuit").run(tiny_lm, config)
    work = cost.WORK["pursuit"](shape, config, room, 4)
    assert work.forwards == len(seen) and work.batch == max(b for b, _ in seen)
    monkeypatch.undo()
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
    family = AblationFamily()
    config = _config("ablation", ablation_windows=2, ablation_window=16, ablation_ioi_prompts=2, concept_prompts=1)
    probes, _ = family.probes(tiny_lm, config)
    work = cost.WORK["ablation"](shape, config, room, 4)
    assert work.batch == heads_per_forward(tiny_lm, probes[0])  # the corpus windows' probe


def test_pursuit_host_price_counts_dictionaries_steps_and_the_criterion() -> None:
    """The host SOMP price grows with what the ranking loops over: control dictionaries, steps, sample rows."""
    s = Shape.from_config(LLAMA_8B)
    base = _config("pursuit", verify="off")
    ranking, ranking_s = cost.ranking_price(s, base, 60)
    more = cost.ranking_price(s, _config("pursuit", verify="off", control_dictionaries=6), 60)[0]
    assert more > 2 * ranking  # 7 dictionaries per concept instead of 3 (the denominator is shared)
    fewer, fewer_s = cost.ranking_price(s, _config("pursuit", verify="off", steps=2), 60)
    assert fewer < ranking and fewer_s < ranking_s
    assert cost.ranking_price(s, base, 600)[0] > ranking  # criterion l1 correlates with every sample
    l2 = _config("pursuit", verify="off", criterion="l2")
    assert cost.ranking_price(s, l2, 600)[0] == cost.ranking_price(s, l2, 60)[0]  # l2 reads d_head factor rows
    # per-head dictionaries (the readout's shortlists) compute one Gram row per step
    shared, _ = cost.somp_price(s, 32, 512, 128, 10, shared=True)
    per_head, _ = cost.somp_price(s, 32, 512, 128, 10, shared=False)
    assert per_head > shared
    unit = cost.estimate(s, "pursuit", base, cost.PROFILES["h200"])
    assert unit.work.host_flops == pytest.approx(ranking + cost.readout_price(s, base)[0])


def test_retrieval_grid_and_tests_match_the_family(tiny_lm) -> None:
    family = get_family("retrieval")
    for options in ({"max_context": 256}, {"max_context": 4096, "retrieval_min_length": 256},
                    {"max_context": 200_000, "retrieval_lengths": 5, "retrieval_min_length": 300}):
        config = _config("retrieval", **options)
        shape = model_shape(tiny_lm.model)
        assert cost.retrieval_grid(shape, config) == family.grid(tiny_lm, config)  # type: ignore[attr-defined]
    long = Shape.from_config({**LLAMA_8B})
    paper = _config("retrieval", max_context=131072, retrieval_lengths=20, retrieval_depths=10,
                    retrieval_min_length=1000)
    grid = cost.retrieval_grid(long, paper)
    assert len(grid) == 20 and grid[-1] == 131072 - 40 - 1
    assert "600 needle tests" in cost.retrieval_work(long, paper, 1e11, 2).notes[0]  # Wu et al.'s 600


def test_flops_are_two_per_parameter_per_token_plus_attention_and_logits() -> None:
    s = Shape.from_config(LLAMA_8B)
    config = _config("patterns", probe_n=255, probe_batch=16384)
    e = cost.estimate(s, "patterns", config, cost.PROFILES["h200"])
    tokens = 16384 * 511
    dense = 2 * s.block_params * tokens
    assert e.work.forward_tokens == tokens
    assert dense < e.flops < 1.6 * dense  # attention (eager, T^2) and the scores add less than 60% at T = 511
    assert e.seconds == pytest.approx(e.flops / cost.PROFILES["h200"].flops, rel=0.2)
    # HeadVis's patterns on an 8B model: minutes on one H200 at MFU 0.4
    assert 60 < e.seconds < 3600


def test_a_70b_model_needs_two_h200s_and_says_so() -> None:
    s = Shape.from_config(LLAMA_70B)
    assert s.params == pytest.approx(70.6e9, rel=0.01)
    config = _config("lens")
    with pytest.raises(BadInput, match="do not fit 1 x 141 GB"):
        cost.estimate(s, "lens", config, cost.PROFILES["h200"])
    e = cost.estimate(s, "lens", config, cost.PROFILES["h200"], devices=2)
    assert e.peak_bytes > e.weight_bytes == pytest.approx(141e9, rel=0.01)


def test_every_family_has_a_price_and_more_work_costs_more() -> None:
    s = Shape.from_config(LLAMA_8B)
    for family in FAMILIES:  # `atlas plan --families all` prices every registered family
        base = cost.estimate(s, family, _config(family), cost.PROFILES["h100"])
        assert base.seconds > 0 and base.flops > 0
    small = cost.estimate(s, "ablation", _config("ablation"), cost.PROFILES["h100"])
    big = cost.estimate(s, "ablation", _config("ablation", ablation_windows=8), cost.PROFILES["h100"])
    assert big.work.forward_tokens > small.work.forward_tokens and big.seconds > small.seconds
    # the readout shortlist (vocabulary x d_model x heads x rank) runs on the device, SOMP on the host
    pursuit = cost.estimate(s, "pursuit", _config("pursuit"), cost.PROFILES["h100"])
    assert pursuit.work.device_flops > 2 * 128256 * 4096 * 1024 * 4 and pursuit.work.host_flops > 0
    with pytest.raises(BadInput, match="no formula"):
        cost.estimate(s, "nonsense", {}, cost.PROFILES["h100"])


def test_model_configs_are_read_without_weights(tiny_dir, tmp_path) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_dir / "config.json", config_only / "config.json")  # no weights, no tokenizer
    assert cost.model_config(str(config_only))["num_hidden_layers"] == 3
    assert cost.model_config(str(config_only / "config.json"))["hidden_size"] == 32
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(BadInput, match="not a model config"):
        cost.model_config(str(bad))
    with pytest.raises(BadInput, match="no model config"):
        cost.model_config("no-such-thing")


def test_gguf_header_gives_the_shape(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 30), ("embedding_length", 576), ("attention.head_count", 9),
                       ("attention.head_count_kv", 3), ("feed_forward_length", 1536), ("context_length", 8192)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    s = Shape.from_config(cost.model_config(str(path)))
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_head, s.d_ff, s.vocab) == (30, 576, 9, 3, 64, 1536,
                                                                                           100)


def test_atlas_plan_prints_units_and_a_total(tiny_dir, tmp_path) -> None:
    from cli.main import app

    config = tmp_path / "llama8b.json"
    config.write_text(json.dumps(LLAMA_8B))
    result = runner.invoke(app, ["plan", "--model", str(config), "--families", "patterns,lens", "--gpu", "h200",
                                 "-o", "probe_batch=16384", "-o", "probe_n=255", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [u["family"] for u in out["units"]] == ["patterns", "lens"]
    assert out["units"][0]["tokens"] == 16384 * 511
    assert out["total"]["seconds"] == pytest.approx(sum(u["seconds"] for u in out["units"]), abs=0.2)
    assert "assumed" in out["profiles"][str(config)]
    bad = runner.invoke(app, ["plan", "--model", str(config), "--gpu", "tpu"])
    assert bad.exit_code == 2 and "unknown --gpu" in bad.output
    typo = runner.invoke(app, ["plan", "--model", str(config), "-o", "probe_btach=3", "--gpu", "h100"])
    assert typo.exit_code == 2 and "probe_btach" in typo.output
    assert runner.invoke(app, ["plan"]).exit_code == 2


def test_atlas_plan_reads_a_sweep_file_and_calibrates_on_this_cpu(tiny_dir, tmp_path: Path) -> None:
    from cli.main import app

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"builds:\n  - models: [{tiny_dir}]\n    families: [patterns]\n"
                     f"  - models: [{tiny_dir}]\n    families: [lens]\n    options: {{lens_windows: 2}}\n")
    result = runner.invoke(app, ["plan", str(sweep), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [u["family"] for u in out["units"]] == ["patterns", "lens"]
    assert out["units"][1]["tokens"] == 2 * 128
    assert out["profiles"][str(tiny_dir)].startswith("measured")
