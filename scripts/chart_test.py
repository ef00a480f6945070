"""Checks of the Helm chart, run by scripts/chart-test.sh in its venv.

For every values file in deploy/helm/embedfleet/tests/values/ (and the chart's defaults):
  1. the real Helm engine (helm-python-sdk: Helm v4 as a library) renders the chart, enforcing
     values.schema.json, and `helm lint --strict` passes;
  2. every object passes `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, unknown
     fields rejected), each ScaledObject passes KEDA's CRD schema and each nats-jetstream
     trigger's metadata passes the scaler's parameter list;
  3. what the objects say is checked against the values: GPU limits, tolerations, probes, one
     trigger per model consumer named as embedfleet-proto names it, PDBs, HPAs when KEDA is off.
Then bad values must be refused by the schema (or by the templates' own checks).

The stream and consumer names are read from crates/embedfleet-proto/src/subjects.rs, so a
rename there that the chart does not follow fails here (and in the Rust test
crates/embedfleet-proto/tests/chart_names.rs).

Prints one line per check group and ends with "chart: N passed, N failed".
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback

import helm_python as helm
import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/embedfleet"
VALUES_DIR = CHART / "tests/values"
SCHEMAS = CHART / "tests/schemas"
SUBJECTS_RS = ROOT / "crates/embedfleet-proto/src/subjects.rs"
KUBERNETES_VERSION = "1.30.0"
RELEASE, NAMESPACE = "ef", "embeddings"


def proto_names() -> tuple[str, str]:
    """JOB_STREAM and the consumer-name prefix, as embedfleet-proto spells them."""
    source = SUBJECTS_RS.read_text()
    stream = re.search(r'pub const JOB_STREAM: &str = "([^"]+)";', source)
    consumer = re.search(
        r'pub fn model_consumer_name\(model: &str\) -> String \{\s*format!\("([^"{]*)\{model\}"\)',
        source,
    )
    assert stream and consumer, f"cannot find JOB_STREAM / model_consumer_name in {SUBJECTS_RS}"
    return stream.group(1), consumer.group(1)


JOB_STREAM, CONSUMER_PREFIX = proto_names()
CATALOGUE_MODELS = {
    "minilm", "bge-large", "instructor-xl", "clip-vit-l", "whisper-large", "codebert",
    "sentence-t5-xxl", "mpnet", "contriever", "dragon-plus", "gte-large", "e5-mistral",
}


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def run(self, name: str, check, *args) -> None:
        try:
            check(*args)
        except Exception:  # noqa: BLE001 - a failed check is reported, the rest still run
            self.failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
        else:
            self.passed += 1
            print(f"ok   {name}")


def load_values(path: pathlib.Path | None) -> dict:
    return yaml.safe_load(path.read_text()) if path else {}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            assert RELEASE in text, "NOTES.txt renders"
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects


def effective(values: dict) -> dict:
    """The chart's values.yaml with `values` merged over it, as Helm coalesces them."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(a, b):
        for key, value in b.items():
            if isinstance(value, dict) and isinstance(a.get(key), dict):
                merge(a[key], value)
            else:
                a[key] = value
        return a

    return merge(base, copy.deepcopy(values))


def group_settings(values: dict, group: dict) -> dict:
    merged = copy.deepcopy(values["workerDefaults"])
    merged.setdefault("gpu", {"count": 0, "type": "nvidia.com/gpu", "product": ""})

    def merge(a, b):
        for key, value in b.items():
            if isinstance(value, dict) and isinstance(a.get(key), dict):
                merge(a[key], value)
            else:
                a[key] = value
        return a

    return merge(merged, copy.deepcopy(group))


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


# ---- validation against the real schemas ---------------------------------------------------

def validate_kubernetes(objects: list[dict]) -> None:
    """`kubernetes-validate --strict` on every object (it skips the CRD kinds, checked below)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(objects, f)
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--no-warn",
         "-k", KUBERNETES_VERSION, f.name],
        capture_output=True, text=True,
    )
    pathlib.Path(f.name).unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    core = [o for o in objects if o["kind"] not in ("ScaledObject", "ServiceMonitor")]
    assert result.stdout.count(" passed ") == len(core), result.stdout


SCALED_OBJECT_SCHEMA = next(
    v["schema"]["openAPIV3Schema"]
    for v in yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())["spec"]["versions"]
    if v["name"] == "v1alpha1"
)
SCALER_PARAMS = json.loads((SCHEMAS / "keda-nats-jetstream-scaler-schema.json").read_text())


def validate_keda(objects: list[dict]) -> None:
    for so in by_kind(objects, "ScaledObject").values():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
        params = {p["name"]: p for p in SCALER_PARAMS["parameters"]}
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == SCALER_PARAMS["type"], trigger
            metadata = trigger["metadata"]
            unknown = set(metadata) - set(params)
            assert not unknown, f"unknown nats-jetstream parameters {unknown}"
            missing = {n for n, p in params.items() if not p.get("optional") and "default" not in p} - set(metadata)
            assert not missing, f"missing required parameters {missing}"
            assert "account" in metadata or "accountID" in metadata
            assert all(isinstance(v, str) for v in metadata.values()), metadata
            assert int(metadata["lagThreshold"]) > 0


# ---- what the objects say --------------------------------------------------------------------

def check_workers(values: dict, objects: list[dict]) -> None:
    values = effective(values)
    deployments = by_kind(objects, "Deployment")
    pdbs = by_kind(objects, "PodDisruptionBudget")
    scaled = by_kind(objects, "ScaledObject")
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    fullname = f"{RELEASE}-embedfleet"
    worker_deployments = {n for n, d in deployments.items()
                          if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}
    assert worker_deployments == {f"{fullname}-worker-{g['name']}" for g in values["workerGroups"]}
    for group in values["workerGroups"]:
        g = group_settings(values, group)
        name = f"{fullname}-worker-{g['name']}"
        pod = deployments[name]["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "worker")
        args = container["args"]
        assert args[0] == "worker"
        auth = values["nats"]["auth"]
        check_auth_mount(deployments[name], {e["name"]: e for e in container["env"]}, "nats",
                         auth["workerSecret"], auth["files"], "EMBEDFLEET_NATS_TLS_CA")
        assert f"--models={','.join(g['models'])}" in args, args
        assert "--model-dir=/models" in args
        assert f"--http-addr=0.0.0.0:{values['http']['port']}" in args
        assert set(g["models"]) <= CATALOGUE_MODELS, g["models"]
        gpus = g["gpu"]["count"]
        limits = container["resources"].get("limits", {})
        tolerations = pod.get("tolerations", [])
        if gpus:
            assert limits[g["gpu"]["type"]] == gpus, limits
            assert "--device=cuda:0" in args
            assert {"key": g["gpu"]["type"], "operator": "Exists", "effect": "NoSchedule"} in tolerations
            if g["gpu"].get("product"):
                assert pod["nodeSelector"]["nvidia.com/gpu.product"] == g["gpu"]["product"]
        else:
            assert not any("gpu" in k for k in limits), limits
            assert not any(a.startswith("--device") for a in args)
        for toleration in group.get("tolerations", []) + values.get("tolerations", []):
            assert toleration in tolerations, (toleration, tolerations)
        for key, value in group.get("nodeSelector", {}).items():
            assert pod["nodeSelector"][key] == value
        if g.get("dtype"):
            assert f"--dtype={g['dtype']}" in args
        # Probes: ready = models loaded; the startup budget covers a 7B load (>= 10 minutes).
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, startup
        assert {"name": "http", "containerPort": values["http"]["port"], "protocol": "TCP"} in container["ports"]
        # Volumes: the model cache and /dev/shm in memory.
        volumes = {v["name"]: v for v in pod["volumes"]}
        cache = g["modelCache"]
        if cache["type"] == "emptyDir":
            assert "emptyDir" in volumes["models"]
        elif cache["type"] == "pvc":
            claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
            assert claim in by_kind(objects, "PersistentVolumeClaim")
        else:
            assert volumes["models"]["persistentVolumeClaim"]["claimName"] == cache["existingClaim"]
        if g["shm"]["enabled"]:
            assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
            assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        init = pod.get("initContainers", [])
        if g["fetch"]["enabled"]:
            assert init[0]["args"][:2] == ["fetch", f"--models={','.join(g['models'])}"]
        else:
            assert not init
        # Disruption budget and scaling.
        if g["pdb"]["enabled"]:
            assert pdbs[name]["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
        autoscaled = g["autoscaling"]["enabled"]
        assert ("replicas" in deployments[name]["spec"]) == (not autoscaled)
        if autoscaled and values["keda"]["enabled"]:
            so = scaled[name]["spec"]
            assert so["scaleTargetRef"]["name"] == name
            assert so["minReplicaCount"] == g["autoscaling"]["minReplicas"]
            assert so["maxReplicaCount"] == g["autoscaling"]["maxReplicas"]
            assert so["fallback"]["replicas"] == g["autoscaling"]["fallback"]["replicas"]
            triggers = so["triggers"]
            assert [t["metadata"]["consumer"] for t in triggers] == [CONSUMER_PREFIX + m for m in g["models"]]
            for t in triggers:
                assert t["metadata"]["stream"] == JOB_STREAM
                assert t["metadata"]["natsServerMonitoringEndpoint"] == values["nats"]["monitoringEndpoint"]
                assert t["metadata"]["account"] == values["nats"]["account"]
                assert t["metadata"]["lagThreshold"] == str(g["autoscaling"]["lagThreshold"])
                assert t["metadata"]["activationLagThreshold"] == str(g["autoscaling"]["activationLagThreshold"])
            assert name not in hpas
        elif autoscaled:
            hpa = hpas[name]["spec"]
            assert hpa["minReplicas"] == max(1, g["autoscaling"]["minReplicas"])
            assert hpa["metrics"][0]["resource"]["name"] == "cpu"
            assert name not in scaled
        else:
            assert name not in scaled and name not in hpas
            assert deployments[name]["spec"]["replicas"] == g["replicas"]


def check_coordinator(values: dict, objects: list[dict]) -> None:
    values = effective(values)
    name = f"{RELEASE}-embedfleet-coordinator"
    deployment = by_kind(objects, "Deployment")[name]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "coordinator"
    assert f"--models={','.join(values['coordinator']['models'])}" in args
    env = {e["name"]: e for e in container["env"]}
    if values["nats"]["urlSecret"]["name"]:
        assert env["EMBEDFLEET_NATS_URL"]["valueFrom"]["secretKeyRef"]["name"] == values["nats"]["urlSecret"]["name"]
        assert "value" not in env["EMBEDFLEET_NATS_URL"]
    else:
        assert env["EMBEDFLEET_NATS_URL"]["value"] == values["nats"]["url"]
    redis = values["redis"]
    assert ("EMBEDFLEET_REDIS_URL" in env) == bool(redis["url"] or redis["urlSecret"]["name"])
    check_auth_mount(deployment, env, "nats", values["nats"]["auth"]["coordinatorSecret"],
                     values["nats"]["auth"]["files"], "EMBEDFLEET_NATS_TLS_CA")
    check_auth_mount(deployment, env, "redis", redis["auth"]["secret"], redis["auth"]["files"],
                     "EMBEDFLEET_REDIS_TLS_CA")
    if redis["auth"]["secret"] and redis["auth"]["files"]["password"]:
        assert env["EMBEDFLEET_REDIS_PASSWORD_FILE"]["value"] == (
            f"/etc/embedfleet/redis/{redis['auth']['files']['password']}")
    assert name in by_kind(objects, "Service")
    assert name in by_kind(objects, "PodDisruptionBudget")
    assert (name in by_kind(objects, "HorizontalPodAutoscaler")) == values["coordinator"]["autoscaling"]["enabled"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    if values["coordinator"]["fusionWeights"]["existingClaim"]:
        assert f"--fusion-weights=/fusion/{values['coordinator']['fusionWeights']['file']}" in args
    monitors = by_kind(objects, "ServiceMonitor")
    assert bool(monitors) == values["metrics"]["serviceMonitor"]["enabled"]
    assert bool(by_kind(objects, "NetworkPolicy")) == values["networkPolicy"]["enabled"]
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, o["metadata"]


def check_auth_mount(deployment: dict, env: dict, kind: str, secret: str, files: dict,
                     ca_var: str) -> None:
    """A role's credentials Secret is mounted read-only at /etc/embedfleet/<kind> and its CA
    variable points into it; without a Secret, neither mount nor variable."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m for m in pod["containers"][0].get("volumeMounts", [])}
    name = f"{kind}-auth"
    if not secret:
        assert name not in volumes and name not in mounts and ca_var not in env
        return
    assert volumes[name]["secret"]["secretName"] == secret
    assert mounts[name] == {"name": name, "mountPath": f"/etc/embedfleet/{kind}", "readOnly": True}
    if files["tlsCa"]:
        assert env[ca_var]["value"] == f"/etc/embedfleet/{kind}/{files['tlsCa']}"


# ---- values the chart must refuse -----------------------------------------------------------

BAD_VALUES = {
    "unknown top-level key": {"workerGroup": []},
    "unknown key in a group": {"workerGroups": [{"name": "a", "models": ["minilm"], "gpus": 1}]},
    "GPU count as a string": {"workerGroups": [{"name": "a", "models": ["minilm"], "gpu": {"count": "1"}}]},
    "two GPUs in one worker": {"workerGroups": [{"name": "a", "models": ["minilm"], "gpu": {"count": 2}}]},
    "no models": {"workerGroups": [{"name": "a", "models": []}]},
    "model name with a dot (not a subject token)": {"workerGroups": [{"name": "a", "models": ["mini.lm"]}]},
    "group name not a DNS label": {"workerGroups": [{"name": "GPU_0", "models": ["minilm"]}]},
    "negative max replicas": {"workerDefaults": {"autoscaling": {"maxReplicas": -1}}},
    "lag threshold as a string": {"workerDefaults": {"autoscaling": {"lagThreshold": "64"}}},
    "keda.enabled not a boolean": {"keda": {"enabled": "yes"}},
    "unknown model cache type": {"workerDefaults": {"modelCache": {"type": "hostPath"}}},
    "monitoring endpoint with a scheme": {"nats": {"monitoringEndpoint": "http://nats:8222"}},
    "NATS url without nats://": {"nats": {"url": "nats.nats:4222"}},
    "a duplicated group name": {"workerGroups": [{"name": "a", "models": ["minilm"]}, {"name": "a", "models": ["mpnet"]}]},
    "fusion weights claim without a file": {"coordinator": {"fusionWeights": {"existingClaim": "w"}}},
}


def check_refused(case: str, values: dict) -> None:
    try:
        render(values)
    except (helm.HelmValuesError, helm.HelmRenderError) as error:
        assert str(error).strip(), case
        return
    raise AssertionError(f"{case}: rendered without error")


def check_lint() -> None:
    report = helm.lint(str(CHART), strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert not errors, errors


def check_readme_documents_every_value() -> None:
    """Every leaf key of values.yaml (and of a worker group) appears in the chart README."""
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    # Documented as a whole: Kubernetes' own structures, and each probe's two numbers.
    whole = {"resources", "podSecurityContext", "securityContext", "startup", "readiness", "liveness"}

    def leaves(prefix, node):
        if isinstance(node, dict) and node and prefix.rsplit(".", 1)[-1] not in whole:
            for key, value in node.items():
                yield from leaves(f"{prefix}.{key}" if prefix else key, value)
        else:
            yield prefix

    schema = json.loads((CHART / "values.schema.json").read_text())
    group_keys = schema["properties"]["workerGroups"]["items"]["properties"]
    missing = [k for k in leaves("", values) if k != "workerGroups" and f"`{k}`" not in readme]
    missing += [f"workerGroups[].{k}" for k in group_keys if f"`workerGroups[].{k}`" not in readme]
    assert not missing, f"not documented in {CHART / 'README.md'}: {missing}"


COMPOSE = ROOT / "compose.yaml"
NATS_CONF = ROOT / "deploy/nats/nats.conf"


def check_compose() -> None:
    """compose.yaml parses and describes a whole fleet: health checks everywhere, dependencies on
    healthy services that exist, a worker for every default model, the GPU profile."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"nats", "redis", "coordinator"} <= set(services), list(services)
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"]["test"][0] == "CMD", name
        for dependency, how in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert how["condition"] == "service_healthy", (name, dependency)
    nats = services["nats"]
    assert "--max_payload" not in nats["command"], "2.9 rejects the flag; the config file sets it"
    config_mount = next(v for v in nats["volumes"] if v.endswith(":/etc/nats/nats.conf:ro"))
    assert (ROOT / config_mount.split(":")[0]).resolve() == NATS_CONF
    assert "8222:8222" in nats["ports"], "the monitoring port (KEDA's /jsz) is published"

    def flag(command, name):
        return command[command.index(name) + 1]

    coordinator = services["coordinator"]["command"]
    assert coordinator[0] == "coordinator"
    served = set()
    for name, service in services.items():
        command = service.get("command", [])
        if command[:1] == ["worker"]:
            models = flag(command, "--models").split(",")
            assert set(models) <= CATALOGUE_MODELS, models
            if "gpu" in service.get("profiles", []):
                devices = service["deploy"]["resources"]["reservations"]["devices"]
                assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
            else:
                served.update(models)
    assert set(flag(coordinator, "--models").split(",")) <= served, "every default model has a CPU worker"


def check_nats_config() -> None:
    """deploy/nats/nats.conf passes `nats-server -t` on every server here (old and new)."""
    candidates = [pathlib.Path("/usr/sbin/nats-server"), ROOT / "tools/bin/nats-server"]
    servers = [c for c in candidates if c.is_file()]
    assert servers, f"no nats-server in {candidates}"
    for server in servers:
        result = subprocess.run([str(server), "-t", "-c", str(NATS_CONF)], capture_output=True, text=True)
        assert result.returncode == 0, f"{server}: {result.stdout}{result.stderr}"


def main() -> int:
    checks = Checks()
    files = [None] + sorted(VALUES_DIR.glob("*.yaml"))
    for path in files:
        label = path.name if path else "defaults"
        values = load_values(path)
        try:
            objects = render(values)
        except Exception:  # noqa: BLE001
            checks.failed += 1
            print(f"FAIL {label}: render")
            traceback.print_exc()
            continue
        checks.passed += 1
        kinds = sorted({o["kind"] for o in objects})
        print(f"ok   {label}: rendered {len(objects)} objects ({', '.join(kinds)})")
        checks.run(f"{label}: kubernetes-validate --strict", validate_kubernetes, objects)
        checks.run(f"{label}: KEDA CRD and nats-jetstream scaler schema", validate_keda, objects)
        checks.run(f"{label}: worker groups", check_workers, values, objects)
        checks.run(f"{label}: coordinator", check_coordinator, values, objects)
    for case, values in BAD_VALUES.items():
        checks.run(f"refused: {case}", check_refused, case, values)
    checks.run("helm lint --strict", check_lint)
    checks.run("README documents every value", check_readme_documents_every_value)
    checks.run("compose.yaml: a whole fleet with health checks and a GPU profile", check_compose)
    checks.run("deploy/nats/nats.conf: nats-server -t", check_nats_config)
    print(f"chart: {checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
