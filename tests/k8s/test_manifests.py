"""Kubernetes manifests, offline: each overlay rendered by kustomize, every object validated
against the Kubernetes JSON schemas (strict), then the deployment invariants checked."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu", "redis", "redis-cluster")
# Overlays with fusion's profiles and ranking's catalogue in Redis, and the URLs they use.
REDIS_OVERLAYS = ("redis", "redis-cluster")
REDIS_URLS = ("redis://crossrec-redis", "redis+cluster://crossrec-redis")
SERVICES = {"embedding": 50051, "fusion": 50052, "ranking": 50053}
METRICS_PORT = 9090
# Plaintext, health-only (--health-port): the probes' target whether or not TLS is on.
HEALTH_PORT = 8081
NAMESPACE = "crossrec"
# The oldest Kubernetes these manifests claim (native gRPC probes are GA since 1.27) and a
# recent one; kubernetes-validate ships both schemas, so nothing is fetched.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
RUN_AS_USER = 10001


def _render_command(overlay: Path) -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(overlay)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(overlay)]
    pytest.fail("neither kubectl nor kustomize is on PATH, so k8s/overlays cannot be rendered: "
                "install kubectl >= 1.27 (kustomize v5 built in; Debian's kubernetes-client "
                "1.20 is too old) or kustomize >= 5")


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    overlay = K8S / "overlays" / name
    proc = subprocess.run(_render_command(overlay), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"rendering {overlay} failed (exit {proc.returncode}):\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay) -> tuple[dict, ...]:
    return _rendered(overlay)


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: `.venv/bin/pip install "
                    "kubernetes-validate` (it is in the dev extra of pyproject.toml)")
    return kubernetes_validate


# ---- helpers -------------------------------------------------------------------------------

def _of_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _workloads(objects) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")}


def _service_workload(objects, svc: str) -> dict:
    found = _workloads(objects).get(f"crossrec-{svc}")
    assert found is not None, f"no Deployment or StatefulSet crossrec-{svc}"
    return found


def _containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _config(objects, workload: dict) -> dict[str, str]:
    """The CROSSREC_* env a container gets from its ConfigMaps (envFrom) and env."""
    config_maps = _of_kind(objects, "ConfigMap")
    env: dict[str, str] = {}
    for container in workload["spec"]["template"]["spec"]["containers"]:
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref:
                assert ref["name"] in config_maps, f"envFrom names missing ConfigMap {ref['name']}"
                env.update(config_maps[ref["name"]].get("data", {}))
        env.update({e["name"]: e.get("value") for e in container.get("env", [])})
    return env


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _security(workload: dict, container: dict) -> dict:
    """Effective security settings: the container's override the pod's."""
    pod = workload["spec"]["template"]["spec"].get("securityContext", {})
    own = container.get("securityContext", {})
    keys = ("runAsNonRoot", "runAsUser", "seccompProfile")
    return {**{k: pod[k] for k in keys if k in pod}, **own}


# ---- schema --------------------------------------------------------------------------------

def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(objects):
    kv = _kubernetes_validate()
    errors = []
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                where = ".".join(str(p) for p in err.path)
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']} "
                              f"{where}: {err.message}")
            except kv.SchemaNotFoundError as err:
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']}: "
                              f"{err.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", sorted((K8S / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_helper_jobs_are_valid_against_the_kubernetes_schemas(path):
    kv = _kubernetes_validate()
    for obj in (d for d in yaml.safe_load_all(path.read_text()) if d):
        for version in KUBERNETES_VERSIONS:
            kv.validate(obj, version, strict=True)
        assert obj["metadata"].get("namespace") == NAMESPACE


def test_every_object_is_in_the_crossrec_namespace_and_part_of_crossrec(objects):
    for obj in objects:
        meta = obj["metadata"]
        assert meta["labels"].get("app.kubernetes.io/part-of") == "crossrec", meta["name"]
        if obj["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, f"{obj['kind']}/{meta['name']}"


# ---- every container -----------------------------------------------------------------------

def test_every_container_has_cpu_and_memory_requests_and_limits(objects):
    for name, workload in _workloads(objects).items():
        for container in _containers(workload):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(part, {}), \
                        f"{name}/{container['name']} has no {resource} {part[:-1]}"


def test_every_container_runs_non_root_on_a_read_only_root_without_privileges(objects):
    for name, workload in _workloads(objects).items():
        for container in _containers(workload):
            sec = _security(workload, container)
            where = f"{name}/{container['name']}"
            assert sec.get("runAsNonRoot") is True, where
            assert sec.get("readOnlyRootFilesystem") is True, where
            assert sec.get("allowPrivilegeEscalation") is False, where
            assert sec.get("capabilities", {}).get("drop") == ["ALL"], where
            assert sec.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


# ---- the three services --------------------------------------------------------------------

@pytest.mark.parametrize("svc", SERVICES)
def test_service_containers_have_grpc_startup_readiness_and_liveness_probes(objects, svc):
    port = SERVICES[svc]
    for container in _service_workload(objects, svc)["spec"]["template"]["spec"]["containers"]:
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("grpc") == port and ports.get("metrics") == METRICS_PORT
        # Every probe targets the declared plaintext `health` port: the kubelet's gRPC probes
        # cannot do TLS, so probing the main port breaks as soon as TLS is turned on.
        assert ports.get("health") == HEALTH_PORT, f"{svc} declares no health port: {ports}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = container.get(probe, {}).get("grpc")
            assert grpc == {"port": ports["health"], "service": ""}, f"{svc} {probe}: {grpc}"
        # Loading and warming (10-30 s) and waiting for dependencies must not trip liveness.
        startup = container["startupProbe"]
        assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 120
        assert container["securityContext"]["runAsUser"] == RUN_AS_USER


@pytest.mark.parametrize("svc", SERVICES)
def test_service_config_binds_all_interfaces_on_its_port_with_metrics(objects, svc):
    env = _config(objects, _service_workload(objects, svc))
    assert env["CROSSREC_HOST"] == "0.0.0.0"
    assert env["CROSSREC_PORT"] == str(SERVICES[svc])
    assert env["CROSSREC_METRICS_PORT"] == str(METRICS_PORT)
    assert env["CROSSREC_HEALTH_PORT"] == str(HEALTH_PORT)
    assert env["CROSSREC_MODEL_REPO"] == "/models"
    if svc != "embedding":
        assert env["CROSSREC_EMBEDDING_ADDRESS"] == "crossrec-embedding:50051"
    if svc == "ranking":
        assert env["CROSSREC_FUSION_ADDRESS"] == "crossrec-fusion:50052"


@functools.cache
def _flag_env_names(svc: str) -> frozenset[str]:
    """The env twins the server's --help lists (each flag's help ends with `(env NAME)`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSREC_")}
    env["PYTHONPATH"] = f"{REPO / 'gen'}{os.pathsep}{REPO}"
    proc = subprocess.run([sys.executable, "-m", f"services.{svc}.server", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, f"services.{svc}.server --help failed:\n{proc.stderr}"
    return frozenset(re.findall(r"env\s+(CROSSREC_[A-Z0-9_]+)", proc.stdout))


@pytest.mark.parametrize("svc", SERVICES)
def test_service_config_sets_only_flags_the_server_has(objects, svc):
    env = _config(objects, _service_workload(objects, svc))
    unknown = sorted(set(env) - _flag_env_names(svc))
    assert not unknown, f"crossrec-{svc} ConfigMap sets env no flag reads: {unknown}"


@pytest.mark.parametrize("svc", SERVICES)
def test_termination_grace_outlasts_the_server_drain(objects, svc):
    workload = _service_workload(objects, svc)
    env = _config(objects, workload)
    grace_s = float(env.get("CROSSREC_GRACE_S", 10.0))
    pre_stop_s = 0.0
    for container in workload["spec"]["template"]["spec"]["containers"]:
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get(
            "command", [])
        if command[:1] == ["sleep"]:
            pre_stop_s = float(command[1])
    assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        pre_stop_s + grace_s


@pytest.mark.parametrize("svc", SERVICES)
def test_service_exposes_the_grpc_and_metrics_ports_of_its_pods(objects, svc):
    service = _of_kind(objects, "Service").get(f"crossrec-{svc}")
    assert service is not None, f"no Service crossrec-{svc}"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == SERVICES[svc]
    assert ports["grpc"].get("appProtocol") == "grpc"
    assert ports["metrics"]["port"] == METRICS_PORT
    labels = _service_workload(objects, svc)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] and _matches(
        {"matchLabels": service["spec"]["selector"]}, labels)


@pytest.mark.parametrize("svc", SERVICES)
def test_service_has_a_pod_disruption_budget_for_its_pods(objects, svc):
    budgets = [p for p in _of_kind(objects, "PodDisruptionBudget").values()
               if p["apiVersion"] == "policy/v1"]
    labels = _service_workload(objects, svc)["spec"]["template"]["metadata"]["labels"]
    assert any(_matches(p["spec"]["selector"], labels) for p in budgets), svc


def _autoscalers(objects, svc: str) -> list[dict]:
    return [h for h in _of_kind(objects, "HorizontalPodAutoscaler").values()
            if h["apiVersion"] == "autoscaling/v2"
            and h["spec"]["scaleTargetRef"]["name"] == f"crossrec-{svc}"]


def _assert_scales_on_cpu(objects, svc: str) -> dict:
    hpas = _autoscalers(objects, svc)
    assert len(hpas) == 1, f"one autoscaling/v2 HPA for crossrec-{svc}, found {len(hpas)}"
    spec = hpas[0]["spec"]
    assert spec["scaleTargetRef"]["kind"] == _service_workload(objects, svc)["kind"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu"
               and m["resource"]["target"]["type"] == "Utilization" for m in spec["metrics"])
    # An HPA-managed Deployment leaves replicas unset, or every apply would reset the count.
    assert "replicas" not in _service_workload(objects, svc)["spec"]
    return spec


def test_embedding_scales_on_cpu_with_an_autoscaler(objects):
    _assert_scales_on_cpu(objects, "embedding")


def _data_claims(workload: dict) -> set[str]:
    """Persistent volume claims a workload's pods mount, the model repository aside."""
    pod = workload["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v} | {
        t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    return claims - {"crossrec-models"}


def test_ranking_scales_out_only_on_the_shared_redis_catalogue(objects, overlay):
    """The issue asks for an HPA on ranking; it is only sound where every replica serves the
    same catalogue (Redis). On the SQLite catalogue a second pod would start with a catalogue
    of its own, so there ranking is one replica."""
    ranking = _service_workload(objects, "ranking")
    env = _config(objects, ranking)
    claims = _of_kind(objects, "PersistentVolumeClaim")
    if overlay in REDIS_OVERLAYS:
        assert env["CROSSREC_CATALOG_STORE"] == "redis"
        assert env["CROSSREC_CATALOG_REDIS_URL"].startswith(REDIS_URLS)
        assert _assert_scales_on_cpu(objects, "ranking")["minReplicas"] >= 2
        assert "crossrec-ranking-data" not in claims and not _data_claims(ranking)
        return
    assert env.get("CROSSREC_CATALOG_STORE", "sqlite") == "sqlite"
    assert _autoscalers(objects, "ranking") == []
    assert ranking["spec"].get("replicas", 1) == 1
    if ranking["kind"] == "Deployment":
        # A rolling update would start a second pod on the ReadWriteOnce volume.
        assert ranking["spec"]["strategy"]["type"] == "Recreate"
    (claim,) = _data_claims(ranking)
    assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"], \
        "the catalogue file belongs to one pod: its volume to one node"


def test_every_service_pod_mounts_the_model_repository_read_only(objects):
    for svc in SERVICES:
        pod = _service_workload(objects, svc)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/models"]
            assert len(mounts) == 1, f"{svc}: /models mounted {len(mounts)} times"
            assert mounts[0].get("readOnly") is True, svc
            claim = volumes[mounts[0]["name"]].get("persistentVolumeClaim", {})
            assert claim.get("claimName") == "crossrec-models", svc
            assert claim.get("readOnly") is True, svc
    assert "crossrec-models" in _of_kind(objects, "PersistentVolumeClaim")


def test_service_pods_write_only_to_volumes(objects):
    for svc in SERVICES:
        pod = _service_workload(objects, svc)["spec"]["template"]["spec"]
        for container in pod["containers"]:
            mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounted, svc
        env = _config(objects, _service_workload(objects, svc))
        for key in ("CROSSREC_SQLITE_PATH", "CROSSREC_CATALOG_PATH"):
            if key in env:
                assert env[key].startswith("/var/lib/crossrec/"), f"{svc} {key}={env[key]}"
                assert "/var/lib/crossrec" in mounted, svc


# ---- per overlay ---------------------------------------------------------------------------

def _gpu_limits(objects) -> dict[str, str]:
    found = {}
    for name, workload in _workloads(objects).items():
        for container in _containers(workload):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                if "nvidia.com/gpu" in resources.get(part, {}):
                    found[f"{name}/{container['name']}"] = resources[part]["nvidia.com/gpu"]
    return found


def test_only_the_gpu_overlay_puts_embedding_on_one_gpu(objects, overlay):
    gpus = _gpu_limits(objects)
    if overlay != "gpu":
        assert gpus == {}
        return
    assert gpus == {"crossrec-embedding/embedding": 1}
    embedding = _service_workload(objects, "embedding")
    pod = embedding["spec"]["template"]["spec"]
    assert pod.get("nodeSelector"), "GPU pods need a nodeSelector for GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert pod["containers"][0]["image"].split(":")[0].endswith("-gpu")
    assert _config(objects, embedding)["CROSSREC_DEVICE"] == "cuda"


def test_fusion_runs_one_sqlite_replica_unless_on_redis(objects, overlay):
    fusion = _service_workload(objects, "fusion")
    env = _config(objects, fusion)
    replicas = fusion["spec"].get("replicas", 1)
    if overlay in REDIS_OVERLAYS:
        assert env["CROSSREC_STORE"] == "redis"
        assert env["CROSSREC_REDIS_URL"].startswith(REDIS_URLS)
        assert replicas >= 2
        return
    assert env["CROSSREC_STORE"] == "sqlite"
    assert replicas == 1
    if fusion["kind"] == "Deployment":
        # A rolling update would start a second writer on the ReadWriteOnce volume.
        assert fusion["spec"]["strategy"]["type"] == "Recreate"
    assert _data_claims(fusion), "fusion's SQLite file needs a persistent volume"


def test_redis_overlay_runs_redis_with_every_write_fsynced(objects, overlay):
    redis = _of_kind(objects, "StatefulSet").get("crossrec-redis")
    if overlay not in REDIS_OVERLAYS:
        assert redis is None
        return
    assert redis is not None
    service = _of_kind(objects, "Service")[redis["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert redis["spec"]["volumeClaimTemplates"]
    config_maps = _of_kind(objects, "ConfigMap")
    volumes = redis["spec"]["template"]["spec"]["volumes"]
    conf_maps = [config_maps[v["configMap"]["name"]] for v in volumes if "configMap" in v]
    conf = "".join(cm["data"].get("redis.conf", "") for cm in conf_maps)
    settings = [line.split() for line in conf.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert ["appendonly", "yes"] in settings
    assert ["appendfsync", "always"] in settings
    assert "crossrec-fusion-data" not in _of_kind(objects, "PersistentVolumeClaim")


def test_the_cluster_overlay_runs_3_primaries_with_a_replica_each_acknowledged_by_wait(
        objects, overlay):
    if overlay != "redis-cluster":
        return
    redis = _of_kind(objects, "StatefulSet")["crossrec-redis"]
    assert redis["spec"]["replicas"] == 6
    (name,) = [v["configMap"]["name"] for v in redis["spec"]["template"]["spec"]["volumes"]
               if "configMap" in v]
    conf = _of_kind(objects, "ConfigMap")[name]["data"]["redis.conf"]
    settings = [line.split() for line in conf.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert ["cluster-enabled", "yes"] in settings
    create = _of_kind(objects, "Job")["crossrec-redis-cluster-create"]
    script = create["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--cluster-replicas 1" in script
    fusion = _config(objects, _service_workload(objects, "fusion"))
    assert fusion["CROSSREC_REDIS_REPLICA_ACKS"] == "1"


def test_every_service_configured_for_redis_may_reach_it(objects, overlay):
    """Redis has no password: a NetworkPolicy admits exactly the pods that need it."""
    redis = _of_kind(objects, "StatefulSet").get("crossrec-redis")
    if redis is None:
        return
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    admitted = [peer["podSelector"] for policy in _of_kind(objects, "NetworkPolicy").values()
                if _matches(policy["spec"]["podSelector"], redis_labels)
                for rule in policy["spec"].get("ingress", []) for peer in rule.get("from", [])
                if "podSelector" in peer]
    assert admitted, "no NetworkPolicy in front of Redis"
    users = [svc for svc in SERVICES
             if any(str(v).startswith(REDIS_URLS)
                    for v in _config(objects, _service_workload(objects, svc)).values())]
    assert sorted(users) == ["fusion", "ranking"]
    for svc in SERVICES:
        labels = _service_workload(objects, svc)["spec"]["template"]["metadata"]["labels"]
        reaches = any(_matches(selector, labels) for selector in admitted)
        assert reaches == (svc in users), f"{svc}: admitted {reaches}, uses Redis {svc in users}"


def test_fusion_stores_user_ids_keyed_with_a_key_from_a_secret_in_every_overlay(objects):
    fusion = _service_workload(objects, "fusion")
    key_file = _config(objects, fusion).get("CROSSREC_USER_ID_KEY_FILE")
    assert key_file, "fusion keeps raw user ids at rest"
    pod = fusion["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = [m for m in container.get("volumeMounts", [])
              if key_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True, mounts
    secret = volumes[mounts[0]["name"]].get("secret")
    assert secret and secret["secretName"] == "crossrec-fusion-user-id-key"
    assert secret.get("optional") is not True, "fusion must not start without its key"
    assert key_file == f"{mounts[0]['mountPath'].rstrip('/')}/{secret['items'][0]['path']}"
    # The key is created in the cluster, never rendered from the repository.
    assert "crossrec-fusion-user-id-key" not in _of_kind(objects, "Secret")


def _cores(quantity: str) -> float:
    """A CPU quantity ("2", "1500m") in cores."""
    quantity = str(quantity)
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_ranking_runs_one_worker_process_per_core_of_its_cpu_limit(objects):
    """CROSSREC_PROCESSES must be set (os.sched_getaffinity sees the node's cores inside a
    container, not the CPU quota), equal the CPU limit, and the request the limit."""
    workload = _service_workload(objects, "ranking")
    env = _config(objects, workload)
    assert "CROSSREC_PROCESSES" in env, "crossrec-ranking must set its process count"
    processes = int(env["CROSSREC_PROCESSES"])
    (container,) = [c for c in _containers(workload) if c["name"] == "ranking"]
    resources = container["resources"]
    limit, request = _cores(resources["limits"]["cpu"]), _cores(resources["requests"]["cpu"])
    assert limit == processes, f"{processes} worker processes on a {limit}-core CPU limit"
    assert request == limit, f"CPU request {request} below the limit {limit} the workers use"
