"""Build status beside the atlas: which units are pending, running, done or failed, and why.

The driver rewrites `<db stem>_shards/_build.json` atomically as units move; `atlas status` merges it
with the `runs` table and with whether a live build holds the build lock. No DuckDB write is needed
to follow a build, so status never competes with ingest for the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

STATES = ("pending", "running", "complete", "failed")


def shard_root(db: Path) -> Path:
    return db.with_name(db.stem + "_shards")


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".build.lock")


def status_path(db: Path) -> Path:
    return shard_root(db) / "_build.json"


def build_is_live(db: Path) -> bool:
    """True when a build process holds the build lock right now."""
    path = lock_path(db)
    if not path.exists():
        return False
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def write_status(db: Path, status: dict[str, Any]) -> None:
    path = status_path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**status, "updated_at": time.time()}, default=str, indent=1))
    os.replace(tmp, path)


def read_status(db: Path) -> dict[str, Any] | None:
    path = status_path(db)
    if not path.exists():
        return None
    status = json.loads(path.read_text())
    status["live"] = build_is_live(db)
    if not status["live"]:  # the driver died or finished: nothing is running any more
        for unit in status["units"]:
            if unit["state"] == "running":
                unit["state"] = "interrupted"
    return status
