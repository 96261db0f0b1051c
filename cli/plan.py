"""`atlas plan`: what a build or a sweep will run and how long it will take, before it runs (workers/cost.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from atlas.errors import BadInput
from cli.app import FormatOption, JsonFlag, app, key_values, output_format, reports_errors
from cli.output import Format, emit, emit_json, stderr


def _gpu_profile(gpu: str, model_shape: Any, calibrate: bool | None) -> Any:
    from workers import cost

    gpu = gpu.lower()
    if gpu == "here":  # this machine's own device, always measured
        from workers.models import pick_device

        return cost.calibrate(model_shape, pick_device("auto"))
    if gpu not in cost.PROFILES:
        raise BadInput(f"unknown --gpu '{gpu}'", f"use one of {', '.join(cost.PROFILES)} or here")
    if gpu == "cpu" and calibrate is not False:  # this CPU, measured on the model's shape (a second or two)
        return cost.calibrate(model_shape, "cpu")
    return cost.PROFILES[gpu]


@app.command()
@reports_errors
def plan(
    sweep_file: Annotated[Path | None, typer.Argument(help="A sweep YAML file (as `atlas sweep` takes); or use "
                                                           "--model.")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="An alias, repo id, model directory, "
                                                    "config.json or .gguf; repeatable. Only its config is read.")]
    = None,
    families: Annotated[str, typer.Option("--families", help="Comma-separated families, or all.")] = "all",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Family option key=value, as "
                                                     "`atlas build -o`.")] = None,
    gpu: Annotated[str, typer.Option("--gpu", help="h100, h200 (assumed figures), cpu (this CPU, measured) or "
                                                   "here (this machine's device, measured).")] = "cpu",
    devices: Annotated[int, typer.Option("--devices", min=1, help="Devices the model is spread over "
                                                                  "(device_map=auto).")] = 1,
    calibrate: Annotated[bool | None, typer.Option("--calibrate/--no-calibrate", help="Measure this CPU on the "
                                                   "model's shape (default for --gpu cpu).")] = None,
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Estimate a build before running it: per unit the forwards, tokens, FLOPs, minibatch, peak memory and
    wall time, and the total. Reads only model configs, never weights.

    Example: atlas plan --model llama --families patterns,lens --gpu cpu

    Example: atlas plan docker/sweep.yaml --gpu h200
    """
    from workers import cost
    from workers.batching import Shape
    from workers.plan import family_names

    builds: list[tuple[list[str], list[str], dict[str, Any]]] = []
    if sweep_file is not None:
        if model:
            raise BadInput("both a sweep file and --model were given", "pass one of them")
        from cli.sweep import load_sweep

        for request in load_sweep(sweep_file).builds:
            builds.append((list(request.models), family_names(request.families), request.family_options()))
    elif model:
        builds.append((list(model), family_names(families), key_values(option or [])))
    else:
        raise BadInput("nothing to plan", "pass --model MODEL (repeatable) or a sweep file")
    rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    unpriced = sorted({name for _, names, _ in builds for name in names if name not in cost.WORK})
    for models, names, options in builds:
        for spec in models:
            shape = Shape.from_config(cost.model_config(spec))
            profile = _gpu_profile(gpu, shape, calibrate)
            profiles[spec] = profile.source
            for estimate in cost.plan_units(shape, names, options, profile, devices):
                rows.append({"model": spec, **estimate.row()})
    total = {"units": len(rows), "tflop": round(sum(r["tflop"] for r in rows), 3),
             "host_tflop": round(sum(r["host_tflop"] for r in rows), 3),
             "peak_gb": max((r["peak_gb"] for r in rows), default=0.0),
             "seconds": round(sum(r["seconds"] for r in rows), 1)}
    fmt = output_format(fmt, as_json)
    import pyarrow as pa  # loaded when the command runs (the CLI starts light)

    if fmt is Format.json:
        emit_json({"gpu": gpu, "devices": devices, "profiles": profiles, "units": rows, "total": total,
                   "not_priced": unpriced})
        return
    emit(pa.Table.from_pylist(rows), fmt, title="estimated per unit")
    stderr.print(f"total: {total['units']} units, {total['tflop']} TFLOP on the device + {total['host_tflop']} on "
                 f"the host, peak {total['peak_gb']} GB, about {_duration(total['seconds'])} (an estimate)")
    for spec, source in profiles.items():
        stderr.print(f"  {spec}: {source}", highlight=False)
    if unpriced:
        stderr.print(f"  not priced (no formula in workers/cost.py): {', '.join(unpriced)}", highlight=False)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
