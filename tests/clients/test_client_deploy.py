"""The deployment files agree with each other and with the repository (Docker cannot run here).

Parses docker-compose.yml, docker/Dockerfile, docker/prometheus.yml, docker/nginx.conf and the Grafana
provisioning; runs ``docker compose config`` when a compose client is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from client_testkit import documented_metrics  # PyYAML: a dependency of timm

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_commands() -> None:
    services = load_compose()["services"]
    assert set(services) >= {"redis", "api", "gateway", "worker-gpu", "worker-cpu", "prometheus", "grafana"}
    api, gpu, cpu = services["api"], services["worker-gpu"], services["worker-cpu"]
    assert api["command"] == ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
    assert gpu["command"] == cpu["command"] == ["python", "-m", "server.worker"]
    for svc in (api, gpu, cpu):
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis:")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["TOKSERVE_DEVICE"] == "cuda" and cpu["environment"]["TOKSERVE_DEVICE"] == "cpu"
    assert "ports" not in api  # replicas cannot share a host port: the gateway publishes it
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"


def test_compose_bind_mounts_exist() -> None:
    for name, svc in load_compose()["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                if source == "./weights":
                    continue  # created by training / `make`; empty on a fresh clone
                assert (ROOT / source).exists(), f"{name}: {source} missing"


def test_dockerfile_installs_the_project_from_its_own_files() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \. \./clients/python", text, flags=re.M)
    assert (ROOT / "pyproject.toml").exists() and (ROOT / "clients/python/pyproject.toml").exists()
    assert 'CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]' in text
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d for d in deps if d.split("==")[0] in ("torch", "torchvision")]  # what the Dockerfile reads
    assert len(pinned) == 2 and all("==" in d for d in pinned)
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    assert client["name"] == "tokserve" and client["scripts"]["tokserve"] == "tokserve.cli:main"
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "weights", ".git"} <= set(ignored)


def test_prometheus_scrapes_every_tokserve_process() -> None:
    services = load_compose()["services"]
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    found: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                found[name] = sd["port"]
                assert job.get("metrics_path", "/metrics") == "/metrics"
    assert found == {"api": 8000, "worker-gpu": 9100, "worker-cpu": 9100}
    for name, port in found.items():
        svc = services[name]
        assert str(port) in [str(p) for p in svc["expose"]]
        if name.startswith("worker"):
            assert svc["environment"]["TOKSERVE_METRICS_PORT"] == str(port)
    assert f"{services['prometheus']['volumes'][0].split(':')[1]}" == "/etc/prometheus/prometheus.yml"


def test_gateway_proxies_to_the_api_service() -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    assert "resolver 127.0.0.11" in conf and "http://api:8000" in conf and "listen 8000;" in conf
    gateway = load_compose()["services"]["gateway"]
    assert gateway["ports"] == ["${TOKSERVE_PORT:-8000}:8000"]


def test_grafana_provisioning_and_dashboard() -> None:
    services = load_compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/tokserve.yml").read_text())[
        "providers"
    ][0]
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"

    dash = json.loads((DOCKER / "grafana/dashboards/tokserve.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "queue depth", "batch size", "gpu memory"):
        assert topic in titles
    used: set[str] = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]
            used |= {_base_metric(m) for m in re.findall(r"\btokserve_[a-z_]+", target["expr"])}
    documented = set(documented_metrics())
    assert len(documented) == 8
    assert used == documented  # the dashboard reads the documented metrics, all of them, nothing else


def _base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and not name.endswith("_total"):
            return name[: -len(suffix)]
    return name


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose client on this machine; the YAML checks above still ran")
    for args in ([], ["--profile", "cpu"]):
        out = subprocess.run(
            [*cli, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
    services = subprocess.run(
        [*cli, "--profile", "cpu", "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert set(services) == set(load_compose()["services"])
