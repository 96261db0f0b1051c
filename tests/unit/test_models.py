"""Model sources: aliases, directories, GGUF files, and the errors for everything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from atlas.errors import BadInput, NotFound
from workers.models import aliases, load, resolve


def test_unknown_alias_lists_the_known_ones() -> None:
    with pytest.raises(NotFound) as err:
        resolve("lama")
    assert "llama" in err.value.hint and "gemma" in err.value.hint


def test_missing_file() -> None:
    with pytest.raises(NotFound, match="no model file"):
        resolve("./nowhere/model.gguf")


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BadInput, match="not a readable GGUF"):
        resolve(str(bad))


def test_directory_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(BadInput, match="'bert' model"):
        resolve(str(tmp_path))


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    import torch
    from safetensors.torch import load_file

    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    source = resolve(str(pickled))
    assert source.format == "pickle"
    with pytest.raises(BadInput, match="pickle"):
        load(source, "cpu")


def test_directory_source_and_key(tiny_dir: Path) -> None:
    source = resolve(str(tiny_dir))
    assert source.format == "safetensors" and source.architecture == "LlamaForCausalLM"
    assert source.key.startswith("tiny-llama@") and source.key.endswith(":safetensors")
    assert resolve(str(tiny_dir)).key == source.key  # deterministic


def test_loaded_tiny_model_row(tiny_lm) -> None:
    row = tiny_lm.models_row()
    assert (row["n_layers"], row["n_heads"], row["n_kv_heads"], row["d_head"]) == (3, 4, 2, 8)
    assert row["dtype"] == "float32"


def test_cuda_without_a_gpu_is_a_clear_error(tiny_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BadInput, match="CUDA"):
        load(resolve(str(tiny_dir)), "cuda")


def test_aliases_are_data_with_sources() -> None:
    for name, entry in aliases().items():
        assert {"name", "package", "module", "file", "install", "origin"} <= set(entry), name


@pytest.mark.slow
@pytest.mark.parametrize("alias", sorted(aliases()))
def test_every_alias_resolves_offline(alias: str) -> None:
    source = resolve(alias)
    assert source.format == "gguf" and source.quantization and len(source.file_hash) == 64
    assert source.alias == alias and ":gguf:" in source.key


def test_hub_repo_id_resolves_from_the_local_cache_offline(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A repo id with HF_HUB_OFFLINE=1 reads the local hub cache, and records the snapshot revision."""
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    source = resolve("tiny-org/tiny-llama")
    assert source.revision == sha and source.key == f"tiny-org/tiny-llama@{sha[:12]}:safetensors"
    with pytest.raises(NotFound, match="local Hugging Face cache"):
        resolve("tiny-org/not-downloaded")


def test_gguf_is_parsed_once_inside_the_dequantization(tmp_path: Path) -> None:
    """transformers parses a GGUF three times and rebuilds the tensor-name map per tensor; inside
    `_gguf_parsed_once` each is built once, and gguf is as it was afterwards."""
    import gguf
    import numpy as np

    from workers.models import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path))
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert len(gguf.GGUFReader(path).tensors) == 1
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)
