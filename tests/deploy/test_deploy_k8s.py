"""The Kubernetes manifests (``deploy/k8s``): valid offline, and in agreement with the code they deploy.

* Every base file and every rendered overlay validates strictly with ``kubernetes-validate`` (its bundled
  schemas, no cluster). Kinds it has no schema for (the KEDA ``ScaledObject``, kustomize's
  ``Kustomization``) get a structural check here instead.
* Overlays are rendered without the kustomize binary: ``render`` below does what these kustomizations use
  (resources, namespace, labels, strategic-merge patches by path), and every patch must name a resource
  (and containers) that exists in the base, so a renamed resource cannot leave a patch silently unapplied.
* One source of truth for the queue: the KEDA triggers must name exactly the streams and the consumer group
  a worker started from the ConfigMap reads (``server.queue.redis_scripts.Keys`` / ``GROUP`` through
  ``create_queue``), at the Redis the ConfigMap's ``REDIS_URL`` points to.
* Probes use the real health routes; the termination grace periods cover ``TOKSERVE_SHUTDOWN_GRACE_S``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from server.cli import SHUTDOWN_MARGIN_S
from server.engine.specs import resolve_models
from server.queue import create_queue
from server.queue.redis_scripts import GROUP
from server.settings import REPO_ROOT, Settings

K8S = REPO_ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes still widely run, and the newest the package ships schemas for.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
NO_SCHEMA = {("keda.sh/v1alpha1", "ScaledObject"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "PriorityClass"}
# patchMergeKey of the core lists these manifests patch; any other list is replaced (as for CRDs).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
# A model call already running when the grace ends cannot be interrupted: time left for one.
MODEL_CALL_MARGIN_S = 10
COMPOSE = REPO_ROOT / "docker-compose.yml"


# ---------------------------------------------------------------- a small kustomize (what deploy/k8s uses)

def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def strategic_merge(base: Any, patch: Any, *, key: str = "", crd: bool = False) -> Any:
    """Kubernetes strategic merge for the fields used here: maps merge, ``null`` deletes, lists of the core
    types merge on their merge key (containers by name ...), other lists (and every list of a CRD) replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, key=k, crd=crd)
            else:
                out[k] = copy.deepcopy(v)
        return out
    merge_key = None if crd else MERGE_KEYS.get(key)
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            idx = [i for i, x in enumerate(out) if x.get(merge_key) == item.get(merge_key)]
            if idx:
                out[idx[0]] = strategic_merge(out[idx[0]], item, crd=crd)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _ident(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def render(folder: Path) -> list[dict]:
    """The resources ``kubectl kustomize folder`` builds (for the features these kustomizations use)."""
    kz = kustomization(folder)
    docs: list[dict] = []
    for res in kz.get("resources", []):
        target = (folder / res).resolve()
        docs += render(target) if target.is_dir() else load(target)
    for patch in kz.get("patches", []):
        for p in load(folder / patch["path"]):
            matches = [i for i, d in enumerate(docs) if _ident(d) == _ident(p)]
            assert len(matches) == 1, f"{folder.name}/{patch['path']}: patches {_ident(p)}, not in the base"
            crd = (docs[matches[0]]["apiVersion"], p["kind"]) in NO_SCHEMA
            docs[matches[0]] = strategic_merge(docs[matches[0]], p, crd=crd)
    for d in docs:
        if kz.get("namespace") and d["kind"] not in CLUSTER_SCOPED:
            d["metadata"]["namespace"] = kz["namespace"]
        for group in kz.get("labels", []):
            d["metadata"].setdefault("labels", {}).update(group["pairs"])
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if _ident(d) == (kind, name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deploy: dict, name: str) -> dict:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(docs: list[dict], deploy: dict, name: str) -> dict[str, str]:
    """The environment ``name`` of ``deploy`` starts with: its ConfigMaps, then its own ``env``."""
    c = container(deploy, name)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the process in that pod parses them (pydantic-settings reads the environment)."""
    for k in [k for k in os.environ if k.startswith("TOKSERVE_") or k == "REDIS_URL"]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


RENDERINGS = {"base": BASE, **{f"overlays/{p.name}": p for p in OVERLAYS}}


@pytest.fixture(params=sorted(RENDERINGS), scope="module")
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(RENDERINGS[request.param])


# ---------------------------------------------------------------- validation

def test_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} >= {"cpu", "gpu"}


@pytest.mark.parametrize("path", sorted(BASE.glob("*.yaml")), ids=lambda p: p.name)
def test_base_file_validates(path: Path) -> None:
    """Each base file on its own, strictly (unknown fields rejected), as `kubernetes-validate --strict`."""
    docs = load(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NO_SCHEMA:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_rendered_resources_validate(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    idents = [_ident(d) for d in docs]
    assert len(idents) == len(set(idents)), f"{name}: duplicate resources"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject"):
            check_scaled_object(doc, docs)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomizations_are_plain() -> None:
    """Only fields kustomize reads, files that exist, and patches of resources (and containers) in the base."""
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}
    base_docs = render(BASE)
    for folder in [BASE, *OVERLAYS]:
        kz = kustomization(folder)
        assert (kz["apiVersion"], kz["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
        assert set(kz) <= known, f"{folder}: {set(kz) - known} (extend render() in this test first)"
        for res in kz.get("resources", []):
            assert (folder / res).exists(), f"{folder}: resource {res} missing"
        for patch in kz.get("patches", []):
            assert set(patch) == {"path"}, "patches by path only: the patch names its target"
            for p in load(folder / patch["path"]):
                target = find(base_docs, *_ident(p))
                assert p["apiVersion"] == target["apiVersion"]
                for c in p.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                    assert container(target, c["name"]), f"{patch['path']}: no container {c['name']}"


def check_scaled_object(so: dict, docs: list[dict]) -> None:
    """KEDA's ScaledObject has no schema in kubernetes-validate: the fields KEDA defines, the target, and
    the HPA behaviour validated as the autoscaling/v2 HorizontalPodAutoscaler KEDA makes of it."""
    spec = so["spec"]
    known = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
             "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
    assert set(spec) <= known, set(spec) - known
    ref = spec["scaleTargetRef"]
    target = find(docs, ref["kind"], ref["name"])
    assert target["apiVersion"] == ref["apiVersion"] == "apps/v1"
    assert "replicas" not in target["spec"], "KEDA owns the worker count: a fixed `replicas` fights it"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for k in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[k], int) and spec[k] >= 0
    assert set(spec.get("advanced", {})) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount",
                                              "scalingModifiers"}
    hpa_cfg = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    assert set(hpa_cfg) <= {"behavior", "name"}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {k: ref[k] for k in ("apiVersion", "kind", "name")},
                    "minReplicas": spec["minReplicaCount"], "maxReplicas": spec["maxReplicaCount"],
                    "behavior": hpa_cfg.get("behavior", {})}}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)
    assert spec["triggers"]
    for trig in spec["triggers"]:
        assert set(trig) <= {"type", "metadata", "name", "authenticationRef", "metricType", "useCachedMetrics"}
        md = trig["metadata"]
        # KEDA's trigger metadata is map[string]string: an unquoted number fails at admission.
        assert all(isinstance(v, str) for v in md.values()), md


# ---------------------------------------------------------------- agreement with the code

def test_keda_triggers_name_the_worker_streams(rendered: tuple[str, list[dict]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The triggers name exactly the streams and group a worker of this rendering reads, at its Redis."""
    name, docs = rendered
    so = find(docs, "ScaledObject", "tokserve-worker")
    worker = find(docs, *("Deployment", so["spec"]["scaleTargetRef"]["name"]))
    env = env_of(docs, worker, "worker")
    # The pods mount the weights at /app/weights, as docker-compose.yml mounts ./weights: read them here.
    env["TOKSERVE_MODELS"] = env["TOKSERVE_MODELS"].replace("/app/weights", str(REPO_ROOT / "weights"))
    settings = settings_of(env, monkeypatch)
    models = resolve_models(settings.models, settings.default_tokenizer, settings.default_generator)
    queue = create_queue(settings)  # the worker's own queue object (no connection is made)
    expected = {s for kind in models.queue_kinds() for s in queue.keys.streams(kind)}
    assert len(expected) == 3 * len(models.queue_kinds())  # encode, decode, generate x 3 priority bands

    triggers = so["spec"]["triggers"]
    assert all(t["type"] == "redis-streams" for t in triggers)
    assert {t["metadata"]["stream"] for t in triggers} == expected
    assert len(triggers) == len(expected)
    url = urlparse(settings.redis_url)
    redis_svc = find(docs, "Service", url.hostname)
    port = next(p["port"] for p in redis_svc["spec"]["ports"])
    assert (url.port or 6379) == port
    ns = redis_svc["metadata"].get("namespace", "default")
    assert ns == so["metadata"].get("namespace", "default")
    for t in triggers:
        md = t["metadata"]
        assert md["consumerGroup"] == GROUP
        # The KEDA operator resolves the address from its own namespace: the Service's full DNS name.
        assert md["address"] == f"{url.hostname}.{ns}.svc.cluster.local:{port}"
        assert md["databaseIndex"] == (url.path.lstrip("/") or "0")
        assert int(md["pendingEntriesCount"]) >= 1
        assert "lagCount" not in md and "streamLength" not in md, "scaled on pending entries (XPENDING)"
    # The API pods read the same settings: they enqueue on the same streams.
    api_env = env_of(docs, find(docs, "Deployment", "tokserve-api"), "api")
    for k in ("REDIS_URL", "TOKSERVE_REDIS_PREFIX", "TOKSERVE_MODELS"):
        assert api_env.get(k) == find(docs, "ConfigMap", "tokserve-config")["data"].get(k), k


def _route_paths() -> set[str]:
    from server.routes.health import router

    return {r.path for r in router.routes}


def test_api_probes_ports_and_grace(rendered: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    _, docs = rendered
    api = find(docs, "Deployment", "tokserve-api")
    c = container(api, "api")
    compose = yaml.safe_load(COMPOSE.read_text())
    assert c["command"] == compose["services"]["api"]["command"]  # the argv the deploy tests start
    port = int(c["command"][c["command"].index("--port") + 1])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    routes = _route_paths()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert named.get(get["port"], get["port"]) == port
    svc = find(docs, "Service", "tokserve-api")
    assert svc["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert named[svc["spec"]["ports"][0]["targetPort"]] == port

    settings = settings_of(env_of(docs, api, "api"), monkeypatch)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    need = float(pre_stop[1]) + settings.shutdown_grace_s + SHUTDOWN_MARGIN_S + MODEL_CALL_MARGIN_S
    tgps = api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert tgps >= need, f"API grace {tgps} s < preStop + TOKSERVE_SHUTDOWN_GRACE_S + margins = {need} s"
    default = Settings.model_fields["shutdown_grace_s"].default
    assert tgps >= float(pre_stop[1]) + default + SHUTDOWN_MARGIN_S + MODEL_CALL_MARGIN_S


def test_worker_command_metrics_and_grace(rendered: tuple[str, list[dict]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name, docs = rendered
    worker = find(docs, "Deployment", "tokserve-worker")
    c = container(worker, "worker")
    compose = yaml.safe_load(COMPOSE.read_text())
    assert c["command"] == compose["services"]["worker-gpu"]["command"] == ["python", "-m", "server.worker"]
    settings = settings_of(env_of(docs, worker, "worker"), monkeypatch)
    assert settings.redis_url, "standalone workers need the Redis backend"
    assert settings.metrics_port in {p["containerPort"] for p in c["ports"]}
    live = c["livenessProbe"]["httpGet"]
    assert live["path"] == "/metrics"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}.get(live["port"]) == settings.metrics_port
    tgps = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    default = Settings.model_fields["shutdown_grace_s"].default
    assert tgps >= max(settings.shutdown_grace_s, default) + MODEL_CALL_MARGIN_S


def test_prometheus_annotations_name_real_ports(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for name in ("tokserve-api", "tokserve-worker"):
        tmpl = find(docs, "Deployment", name)["spec"]["template"]
        ann = tmpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        ports = {p["containerPort"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
        assert int(ann["prometheus.io/port"]) in ports


def test_redis_append_only_on_a_persistent_volume(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    sts = find(docs, "StatefulSet", "redis")
    c = container(sts, "redis")
    args = " ".join(c.get("command", []) + c.get("args", []))
    assert re.search(r"--appendonly yes\b", args)
    assert re.search(r"--maxmemory-policy noeviction\b", args), "evicting queue keys would lose jobs"
    data_dir = re.search(r"--dir (\S+)", args).group(1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == data_dir)
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims
    assert sts["spec"]["serviceName"] == "redis" and find(docs, "Service", "redis")["spec"]["clusterIP"] == "None"


def test_gpu_overlay_puts_workers_on_gpus() -> None:
    docs = render(K8S / "overlays" / "gpu")
    spec = find(docs, "Deployment", "tokserve-worker")["spec"]["template"]["spec"]
    c = container({"spec": {"template": {"spec": spec}}}, "worker")
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert c["image"].endswith(":gpu")
    assert {e["name"]: e.get("value") for e in c["env"]}["TOKSERVE_DEVICE"] == "cuda"
    assert container(find(docs, "Deployment", "tokserve-api"), "api")["image"].endswith(":cpu")  # API: no GPU
    for other in (render(BASE), render(K8S / "overlays" / "cpu")):
        w = container(find(other, "Deployment", "tokserve-worker"), "worker")
        assert "nvidia.com/gpu" not in w["resources"].get("limits", {})
        assert not w["image"].endswith(":gpu")


def test_every_setting_named_exists(rendered: tuple[str, list[dict]]) -> None:
    """Settings ignore unknown variables, so a misspelt TOKSERVE_* name in a manifest would do nothing."""
    _, docs = rendered
    fields = {f"TOKSERVE_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    for name in ("tokserve-api", "tokserve-worker"):
        deploy = find(docs, "Deployment", name)
        for c in deploy["spec"]["template"]["spec"]["containers"]:
            named = set(env_of(docs, deploy, c["name"]))
            assert named <= fields, f"{name}/{c['name']}: unknown settings {sorted(named - fields)}"
