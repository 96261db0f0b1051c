"""Issue 15, item 5: a bad file where the CLI expects an atlas, a model or a corpus gives exit code 2
and one clear line (plus its hint), never a traceback."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.integration.test_server_support import build_tiny_atlas
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def good_db(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("cli-bad") / "atlas.duckdb"
    build_tiny_atlas(db, [tiny_dir])
    return db


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args} raised {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, text


def assert_clear(code: int, text: str) -> None:
    assert code == 2, (code, text)
    assert "Traceback" not in text and 'File "' not in text, text
    assert "error:" in text, text


def truncated(src: Path, dst: Path, keep: float) -> Path:
    dst.write_bytes(src.read_bytes()[: int(src.stat().st_size * keep)])
    return dst


EVERY_TABLE = ("SELECT (SELECT count(*) FROM head_metrics), (SELECT count(*) FROM runs), "
               "(SELECT count(*) FROM models), (SELECT sum(length(config)) FROM runs)")


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.1, 0.2, 0.5, 0.9])
def test_truncated_atlas(good_db: Path, tmp_path: Path, keep: float) -> None:
    """Cut at the header, the catalog, or the data: exit 2 with the reason (a cut past every block
    read may still answer, which is fine; a traceback never is)."""
    db = truncated(good_db, tmp_path / "cut.duckdb", keep)
    code, text = run("query", EVERY_TABLE, "--db", str(db))
    if keep <= 0.2 or code != 0:
        assert_clear(code, text)


def test_directory_as_atlas(tmp_path: Path) -> None:
    assert_clear(*run("query", "SELECT 1", "--db", str(tmp_path)))
    assert_clear(*run("models", "--db", str(tmp_path)))


def gguf(path: Path, *fields: tuple[str, int, bytes]) -> Path:
    """A GGUF header: magic, version 3, no tensors, the given (key, type, packed value) fields."""
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields))
    for key, kind, value in fields:
        body += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
    path.write_bytes(body)
    return path


def string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def bad_models(root: Path) -> dict[str, Path]:
    """Model files and directories that are broken in the ways the issue lists."""
    good = save_tiny(root / "good", "LlamaForCausalLM")
    out = {}
    for name, content in {"not-utf8": b'{"architectures": ["Llama\xff\xfe"]}', "not-json": b'{"architectures": [',
                          "a-list": b"[1, 2]", "archs-not-list": b'{"architectures": 5}'}.items():
        model = root / name
        model.mkdir()
        (model / "config.json").write_bytes(content)
        out[name] = model
    config_dir = root / "config-is-a-dir"
    (config_dir / "config.json").mkdir(parents=True)
    out["config-is-a-dir"] = config_dir
    out["gguf-truncated"] = root / "cut.gguf"
    out["gguf-truncated"].write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00\x00")
    out["gguf-bad-magic"] = root / "magic.gguf"
    out["gguf-bad-magic"].write_bytes(b"NOPE" + b"\x00" * 64)
    out["gguf-huge-string"] = gguf(root / "huge.gguf", ("general.architecture", 8, struct.pack("<Q", 2**62)))
    out["gguf-huge-array"] = gguf(root / "array.gguf", ("x", 9, struct.pack("<IQ", 12, 2**62)))
    out["gguf-bad-type"] = gguf(root / "type.gguf", ("general.architecture", 8, string("llama")),
                                ("general.name", 8, string("x")), ("general.file_type", 4, struct.pack("<I", 9999)))
    out["gguf-unknown-kind"] = gguf(root / "kind.gguf", ("general.architecture", 77, b""))
    out["gguf-is-a-dir"] = root / "dir.gguf"
    out["gguf-is-a-dir"].mkdir()
    assert good.exists()
    return out


BAD = ["not-utf8", "not-json", "a-list", "archs-not-list", "config-is-a-dir", "gguf-truncated", "gguf-bad-magic",
       "gguf-huge-string", "gguf-huge-array", "gguf-bad-type", "gguf-unknown-kind", "gguf-is-a-dir"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return bad_models(tmp_path_factory.mktemp("bad-models"))


@pytest.mark.parametrize("name", BAD)
def test_bad_model_files(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    code, text = run("build", "--model", str(models[name]), "--families", "patterns", "--executor", "local",
                     "--device", "cpu", "--db", str(tmp_path / "a.duckdb"))
    assert_clear(code, text)
    assert not (tmp_path / "a.duckdb").exists()


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "not-utf8", "empty"])
def test_bad_corpus(tiny_dir: Path, tmp_path: Path, kind: str) -> None:
    corpus = tmp_path / "corpus.txt"
    if kind == "directory":
        corpus.mkdir()
    elif kind == "fifo":
        os.mkfifo(corpus)  # reading it would wait for a writer forever
    elif kind == "device":
        corpus = Path("/dev/zero")  # reading it would never end
    elif kind == "not-utf8":
        corpus.write_bytes(b"caf\xe9 " * 100)
    else:
        corpus.write_text("  \n")
    code, text = run("build", "--model", str(tiny_dir), "--families", "lens", "--corpus", str(corpus),
                     "--executor", "local", "--device", "cpu", "--db", str(tmp_path / "a.duckdb"))
    assert_clear(code, text)


def test_bad_concept_file(tiny_dir: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "words.txt")
    code, text = run("build", "--model", str(tiny_dir), "--families", "pursuit", "--concepts",
                     f"w={tmp_path / 'words.txt'}", "--executor", "local", "--device", "cpu",
                     "--db", str(tmp_path / "a.duckdb"))
    assert_clear(code, text)


def test_gguf_cut_after_its_header(tmp_path: Path) -> None:
    """A real GGUF cut in its tensor data passes the header check and fails when loaded: still exit 2."""
    from workers.models import resolve

    try:
        whole = Path(resolve("llama").path)
    except Exception as exc:  # the embedded weights are not installed here
        pytest.skip(f"no embedded llama: {exc}")
    cut = tmp_path / "cut.gguf"
    with whole.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(whole.stat().st_size * 6 // 10))
    env_cache = os.environ.get("HEAD_ATLAS_CACHE")
    os.environ["HEAD_ATLAS_CACHE"] = str(tmp_path / "cache")  # never leave a half-converted model behind
    try:
        code, text = run("build", "--model", str(cut), "--families", "patterns", "--executor", "local",
                         "--device", "cpu", "--db", str(tmp_path / "a.duckdb"))
    finally:
        if env_cache is None:
            os.environ.pop("HEAD_ATLAS_CACHE")
        else:
            os.environ["HEAD_ATLAS_CACHE"] = env_cache
    assert_clear(code, text)
