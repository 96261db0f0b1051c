"""Files a user names (corpora, concept lists, model directories): where they may be, how they are read.

Two rules. Reading is always bounded: only regular files (a FIFO, a device such as /dev/zero or a
directory is refused before a byte is read, and opening never blocks), at most `max_file_bytes()`.
And when the process serves others (`atlas serve --data-dir DIR`), a path resolves only under
those directories: the server's build checks and builds run `only_under` them, and the workers it
starts inherit ATLAS_DATA_DIRS. Relative paths are taken relative to the directories; `..` or a
symlink that leaves them is refused like a missing file, so a client learns nothing about what lies
outside. The CLI, run by the machine's own user, sets no directories and reads where that user can.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from atlas.errors import BadInput

DATA_DIRS_ENV = "ATLAS_DATA_DIRS"
MAX_FILE_MB_ENV = "ATLAS_MAX_FILE_MB"
DEFAULT_MAX_FILE_MB = 512


def max_file_bytes() -> int:
    try:
        return int(float(os.environ.get(MAX_FILE_MB_ENV, DEFAULT_MAX_FILE_MB)) * 2**20)
    except ValueError:
        return DEFAULT_MAX_FILE_MB * 2**20


_ROOTS: ContextVar[tuple[Path, ...] | None] = ContextVar("atlas_data_dirs", default=None)


@contextmanager
def only_under(roots: Sequence[Path]) -> Iterator[None]:
    """Within this block (this thread or task), user files resolve only under `roots`: the
    server's build checks and in-process builds run so, whatever the process environment says."""
    token = _ROOTS.set(tuple(Path(r) for r in roots))
    try:
        yield
    finally:
        _ROOTS.reset(token)


def allowed_roots() -> list[Path] | None:
    """The directories user files may come from here; None when unrestricted (the CLI)."""
    scoped = _ROOTS.get()
    if scoped is not None:
        return list(scoped)
    raw = os.environ.get(DATA_DIRS_ENV)
    if raw is None:
        return None
    return [Path(p) for p in raw.split(os.pathsep) if p]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(spec: str | Path, roots: Sequence[Path] | None = None) -> Path:
    """The real path of a user-named file or directory under `roots` (default: allowed_roots()).

    Refuses, with one message whatever the reason (missing, outside, escaping by `..` or a
    symlink), anything that is not inside one of the roots."""
    roots = allowed_roots() if roots is None else list(roots)
    if roots is None:
        return Path(spec).expanduser()
    if not roots:
        raise BadInput(f"'{spec}': this server reads no files of its clients",
                       "its operator can allow directories with `atlas serve --data-dir DIR`")
    path = Path(spec)
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    real_roots = [os.path.realpath(root) for root in roots]
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if any(_under(real, root) for root in real_roots) and os.path.exists(real):
            return Path(real)
    raise BadInput(f"'{spec}' is not a file or directory under this server's data directories",
                   "give a path relative to a directory the server's operator allowed (--data-dir)")


def is_confined(path: Path) -> bool:
    """Whether a path (symlinks followed) lies under the allowed roots, or no roots are set."""
    roots = allowed_roots()
    if roots is None:
        return True
    real = os.path.realpath(path)
    return any(_under(real, os.path.realpath(root)) for root in roots)


def read_bytes(path: str | Path, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, refusing anything else at once.
    (Where the file may be is `confine`'s business, done when a user's spec is resolved.)

    O_NONBLOCK makes opening a FIFO return instead of waiting for a writer; fstat then refuses
    it (and devices, sockets, directories) before any read."""
    limit = max_file_bytes() if limit is None else limit
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BadInput(f"no {what} at {path}", "check the path") from None
    except OSError as exc:
        raise BadInput(f"cannot open the {what} {path}: {exc.strerror}", "check the path and its permissions") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BadInput(f"the {what} {path} is a directory, not a file", "pass the file inside it")
        raise BadInput(f"the {what} {path} is not a regular file (a pipe, device or socket)",
                       "pass a regular file")
    if info.st_size > limit:
        os.close(fd)
        raise BadInput(f"the {what} {path} has {info.st_size} bytes, over the limit of {limit}",
                       f"pass a smaller file (the limit is {MAX_FILE_MB_ENV}, in MiB)")
    with os.fdopen(fd, "rb", buffering=0) as handle:
        chunks, total = [], 0
        while chunk := handle.read(min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise BadInput(f"the {what} {path} grew past the limit of {limit} bytes while being read",
                               "pass a file that is not being written")
    return b"".join(chunks)


def read_text(path: str | Path, what: str = "file", limit: int | None = None) -> str:
    raw = read_bytes(path, what, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the {what} {path} is not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})",
                       "re-encode it as UTF-8 (e.g. iconv -t utf-8)") from None
