"""docker/ as far as the tools here allow (no Docker engine): Dockerfiles parse with the official
parser and copy what exists, compose validates, the RayJob matches the image's Ray version."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from cli.sweep import load_sweep

DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_parse_and_copy_what_exists(name: str) -> None:
    dockerfile = pytest.importorskip("dockerfile")
    commands = dockerfile.parse_file(str(DOCKER / name))
    assert commands[0].cmd == "FROM"
    for command in commands:
        if command.cmd == "COPY":
            sources = [v for v in command.value[:-1] if not v.startswith("--")]
            for source in sources:
                assert (DOCKER.parent / source).exists(), source
    assert ("ENTRYPOINT", ("atlas",)) in [(c.cmd, c.value) for c in commands]


def test_cuda_image_and_rayjob_use_the_installed_ray_version() -> None:
    base = (DOCKER / "Dockerfile.cuda").read_text().split("FROM ", 1)[1].split()[0]
    job, config = yaml.safe_load_all((DOCKER / "k8s" / "rayjob.yaml").read_text())
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert job["spec"]["entrypoint"].startswith("atlas sweep")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
    sweep = yaml.safe_load(config["data"]["sweep.yaml"])
    assert sweep["models"] and sweep["ray"]["address"] == "auto"


def test_compose_shares_the_atlas_volume() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker-1", "ray-worker-2", "build"} <= set(services)
    for name, service in services.items():
        assert any(v.endswith(":/atlas") for v in service.get("volumes", [])), name


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian) is not installed")
def test_compose_config_validates() -> None:
    done = subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "--profile", "jobs", "config",
                           "--services"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == {"ray-head", "ray-worker-1", "ray-worker-2", "build", "atlas"}


def test_example_sweep_file_is_valid() -> None:
    spec = load_sweep(DOCKER / "sweep.yaml")
    assert spec.models == ["llama", "gemma"] and spec.ray.address == "ray-head:6379"
