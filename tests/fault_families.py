"""Families for the fault-tolerance tests, loaded through the plugin door (HEAD_ATLAS_FAMILIES).

They compute something real (per-head mean |z| over corpus windows) but slowly, or fail on purpose,
and leave a file per attempt so the tests can find and kill the worker process running a unit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from workers.corpora import load_corpus, token_windows
from workers.families.base import FamilyResult, head_metric_rows
from workers.hooks import capture_z
from workers.models import LoadedModel


class SleepyFamily:
    """Mean |z| per head over a corpus, after a pause long enough to kill the worker mid-unit."""

    name = "sleepy"
    version = 1
    stores = ("head_metrics",)

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"corpus": options.get("corpus"), "corpus_id": load_corpus(options.get("corpus")).corpus_id}

    def probe_set(self, config: dict[str, Any]) -> str:
        return config["corpus_id"]

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        marks = Path(os.environ["FAULT_DIR"])
        (marks / f"{config['corpus_id'].replace(':', '_')}.{os.getpid()}.{time.time_ns()}").touch()
        time.sleep(float(os.environ.get("FAULT_SLEEP_S", "2")))  # not in the config: same run id either way
        tokens = token_windows(load_corpus(config["corpus"]), lm.tokenizer, 8, max_windows=4)
        with capture_z(lm.adapter) as zs, torch.inference_mode():
            lm.model(tokens)
        values = torch.stack([zs[layer].abs().mean((0, 1, 3)) for layer in range(lm.adapter.n_layers)])
        return FamilyResult({"head_metrics": head_metric_rows("sleepy.mean_abs_z", values, None, tokens.numel())},
                            tokens=tokens.numel())


class FlakyFamily(SleepyFamily):
    """Fails like an out-of-memory error at full batch; succeeds once the batch is halved."""

    name = "flaky"

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        if config.get("_batch_divisor", 1) < 2:
            raise MemoryError("simulated out of memory at full batch")
        return super().run(lm, config)


class BrokenFamily(FlakyFamily):
    name = "broken"

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        raise RuntimeError("simulated failure that no smaller batch fixes")


FAMILIES = [SleepyFamily(), FlakyFamily(), BrokenFamily()]
