"""deploy/kubernetes: every overlay renders (kubectl kustomize) and validates offline
against the Kubernetes API schemas; the operator resources and the dashboard come from
their single sources; the pods are locked down the way the issue asks."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from harness import require_tool
from harness.kube import (
    CUSTOM_SCHEMAS,
    Doc,
    container_env,
    expand,
    local_paths,
    materialize_volumes,
    overlay_without,
    quantity,
    render,
    secret_data,
    validate_custom,
)

from mirror.cli import main
from mirror.config import Settings
from mirror.loading import load_settings, unknown_environment
from mirror.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("central", "central-tls", "node-local", "sidecar")
# A current Kubernetes release (native sidecars need 1.29+).
KUBERNETES_VERSION = "1.33"
# CRDs: no schema in the API's set. Certificate has its own (harness.kube.CUSTOM_SCHEMAS).
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _pod_spec(docs: list[Doc]) -> Doc:
    [workload] = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _mirror_container(pod: Doc) -> Doc:
    containers: list[Doc] = pod["containers"] + pod.get("initContainers", [])
    [mirror] = [c for c in containers if c["name"] == "mirror"]
    return mirror


def _config_settings(docs: list[Doc]) -> Settings:
    """The settings file of an overlay's ConfigMap, alone (no MIRROR_* variables)."""
    [config_map] = [c for c in _by_kind(docs, "ConfigMap") if "mirror.yaml" in c["data"]]
    return Settings.model_validate(yaml.safe_load(config_map["data"]["mirror.yaml"]))


def _pod_settings(
    docs: list[Doc], container: Doc, root: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, dict[str, str]]:
    """A container's whole configuration as the kubelet gives it: its ConfigMap and
    Secret volumes as files under `root`, its environment (set with `monkeypatch`)
    resolved. Returns the settings it loads, and that environment."""
    pod = _pod_spec(docs)
    mounted = materialize_volumes(pod, container, docs, root)
    env = local_paths(
        container_env(container, docs, pod_ip="10.0.0.7", host_ip="192.0.2.7"), mounted
    )
    config = Path(env.pop("MIRROR_CONFIG"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(config), {**env, "MIRROR_CONFIG": str(config)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_SCHEMAS:
            validate_custom(doc)
        elif doc["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_would_catch_a_mistake() -> None:
    [deployment] = _by_kind(render("central"), "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mirror_pods_are_locked_down_and_probed(overlay: str) -> None:
    docs = render(overlay)
    pod = _pod_spec(docs)
    mirror = _mirror_container(pod)
    assert mirror["image"] == "ghcr.io/example/registry-mirror:0.1.0"
    context = {**pod.get("securityContext", {}), **mirror["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert mirror["securityContext"]["readOnlyRootFilesystem"] is True
    assert mirror["securityContext"]["allowPrivilegeEscalation"] is False
    assert mirror["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    ready, live = mirror["readinessProbe"], mirror["livenessProbe"]
    if "exec" in ready:  # the sidecar listens on the pod's loopback only
        assert ready["exec"]["command"] == ["mirror", "probe", "--ready"]  # /readyz
        assert live["exec"]["command"] == ["mirror", "probe"]  # /healthz
    else:
        assert (ready["httpGet"]["path"], live["httpGet"]["path"]) == ("/readyz", "/healthz")
    assert "memory" in mirror["resources"]["limits"]
    assert "cpu" not in mirror["resources"]["limits"]  # throttling only slows pulls
    # The grace period outlasts the mirror's own shutdown timeout.
    [config_map] = [c for c in _by_kind(docs, "ConfigMap") if "mirror.yaml" in c["data"]]
    settings = yaml.safe_load(config_map["data"]["mirror.yaml"])
    assert float(settings["shutdown_timeout"].rstrip("s")) < pod["terminationGracePeriodSeconds"]
    # Every other container may not escalate either; only node-local's init containers
    # run as root (to chown the hostPath cache, and write containerd's hosts.toml).
    for container in pod["containers"] + pod.get("initContainers", []):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.usefixtures("no_mirror_env")
def test_settings_in_the_config_map_load() -> None:
    [config_map] = [
        c for c in _by_kind(render("central"), "ConfigMap") if "mirror.yaml" in c["data"]
    ]
    settings = Settings.model_validate(yaml.safe_load(config_map["data"]["mirror.yaml"]))
    assert {u.name for u in settings.resolved_upstreams()} >= {"docker.io", "ghcr.io"}
    assert str(settings.cache_dir) == "/var/cache/mirror"


def test_central_overlay_shape() -> None:
    docs = render("central")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "ConfigMap",
            "Secret",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ServiceMonitor",
        ]
    )
    assert all(
        d["metadata"].get("namespace") == "registry-mirror"
        for d in docs
        if d["kind"] != "Namespace"
    )


def test_central_overlay_runs_replicas_on_the_shared_store() -> None:
    """Three replicas, no shared volume: each pod's L1 is its own, the cache is the
    bucket and Redis; they roll one at a time, spread over nodes, under a budget."""
    docs = render("central")
    [deployment] = _by_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = _pod_spec(docs)
    labels = spec["template"]["metadata"]["labels"]
    # No ReadWriteOnce volume any more: no claim, and no volume that names one.
    assert _by_kind(docs, "PersistentVolumeClaim") == []
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    # The L1: a per-pod volume, capped, with l1_max_size below the cap.
    mirror = _mirror_container(pod)
    [cache_mount] = [m for m in mirror["volumeMounts"] if m["mountPath"] == "/var/cache/mirror"]
    [cache] = [v for v in pod["volumes"] if v["name"] == cache_mount["name"]]
    if "emptyDir" in cache:
        volume_size = quantity(cache["emptyDir"]["sizeLimit"])
    else:
        claim = cache["ephemeral"]["volumeClaimTemplate"]["spec"]
        volume_size = quantity(claim["resources"]["requests"]["storage"])
    env = container_env(mirror, docs, pod_ip="10.0.0.7")
    l1_max_size = parse_size(env["MIRROR_L1_MAX_SIZE"])
    assert l1_max_size is not None and 0 < l1_max_size <= 0.8 * volume_size
    # The budget lets one pod go at a time, and selects exactly these pods.
    [pdb] = _by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 2
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    # Spread over nodes when possible (preferred: a small cluster still schedules).
    anti = pod["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    [term] = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # Each replica tells its peers its own address: the pod IP, from the downward API.
    names = [e["name"] for e in mirror["env"]]
    [pod_ip] = [e for e in mirror["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert names.index("POD_IP") < names.index("MIRROR_PEER_URL")  # $(POD_IP) needs it first
    assert env["MIRROR_PEER_URL"] == "http://10.0.0.7:5000"
    assert env["MIRROR_STORE"] == "s3"


def test_central_secrets_are_mounted_files() -> None:
    """The S3 key, the Redis password and the peer secret come from the Secret as
    files named by *_file settings: never literal values in the manifests' env."""
    docs = render("central")
    pod = _pod_spec(docs)
    mirror = _mirror_container(pod)
    [secret] = _by_kind(docs, "Secret")
    keys = set(secret_data(secret))
    assert {"s3-secret-access-key", "redis-password", "peer-secret"} <= keys
    assert all(v.startswith("REPLACE-ME") for v in secret_data(secret).values())
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    [mount] = [m for m in mirror["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    env = {e["name"]: e for e in mirror["env"]}
    files = {
        "MIRROR_S3_SECRET_ACCESS_KEY_FILE": "s3-secret-access-key",
        "MIRROR_REDIS_PASSWORD_FILE": "redis-password",
        "MIRROR_PEER_SECRET_FILE": "peer-secret",
    }
    for name, key in files.items():
        assert env[name]["value"] == f"{mount['mountPath']}/{key}"
    for name in ("MIRROR_S3_SECRET_ACCESS_KEY", "MIRROR_PEER_SECRET", "MIRROR_REDIS_PASSWORD"):
        assert name not in env
    # The key id is no secret, but lives beside the key: a variable from the Secret.
    ref = env["MIRROR_S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "s3-access-key-id")
    assert "optional" not in ref


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mirror_env_names_are_settings(overlay: str) -> None:
    """Every MIRROR_* variable the manifests set names a setting (the same check
    `mirror serve` warns with): a typo would be silently ignored."""
    docs = render(overlay)
    env = container_env(_mirror_container(_pod_spec(docs)), docs, pod_ip="10.0.0.7")
    assert any(name.startswith("MIRROR_") for name in env)
    assert unknown_environment(env) == []


@pytest.mark.usefixtures("no_mirror_env")
def test_central_pod_settings_load_as_the_kubelet_gives_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The central pod's whole configuration: the ConfigMap's file, the environment
    with the pod IP and Secret resolved, the Secret's files. It loads as store s3, and
    the shared secrets are read from the mounted files."""
    docs = render("central")
    settings, _ = _pod_settings(docs, _mirror_container(_pod_spec(docs)), tmp_path, monkeypatch)
    assert settings.store == "s3"
    assert settings.peer_url == "http://10.0.0.7:5000"
    assert settings.s3_bucket and settings.redis_url is not None
    assert str(settings.cache_dir) == "/var/cache/mirror"
    assert settings.max_size is not None and settings.max_size > settings.l1_max_size
    [secret] = _by_kind(docs, "Secret")
    values = secret_data(secret)
    shared = settings.shared_secrets()
    assert shared.s3_secret_access_key == values["s3-secret-access-key"]
    assert shared.redis_password == values["redis-password"]
    assert shared.peer_secret == values["peer-secret"]
    assert settings.s3_access_key_id == values["s3-access-key-id"]


def test_node_local_overlay_feeds_containerd() -> None:
    docs = render("node-local")
    pod = _pod_spec(docs)
    [init] = [c for c in pod["initContainers"] if c["name"] == "containerd-hosts"]
    assert init["args"][0] == "containerd-hosts"
    assert "--mirror-host=$(NODE_IP)" in init["args"]
    assert "--mirror-port=29500" in init["args"]
    mirror = _mirror_container(pod)
    assert mirror["ports"][0]["hostPort"] == 29500
    assert not 30000 <= 29500 <= 32767  # outside the NodePort range
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    env = {e["name"]: e.get("value") for e in mirror["env"]}
    assert env["MIRROR_MAX_SIZE"] == "15GiB"  # the node's own disk
    hosts = [v for v in pod["volumes"] if v["name"] == "containerd-hosts"]
    assert hosts[0]["hostPath"]["path"] == "/etc/containerd/certs.d"
    [service] = _by_kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"


def _central_service_url() -> tuple[str, str, int]:
    """The central overlay's Service: its name, namespace and http port."""
    docs = render("central")
    [service] = _by_kind(docs, "Service")
    [namespace] = _by_kind(docs, "Namespace")
    assert service["metadata"]["namespace"] == namespace["metadata"]["name"]
    [port] = [p["port"] for p in service["spec"]["ports"] if p["name"] == "http"]
    return service["metadata"]["name"], service["metadata"]["namespace"], port


@pytest.mark.usefixtures("no_mirror_env")
def test_node_local_pod_settings_chain_every_upstream_to_the_central_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both overlays deployed, the node-local mirrors ask the central one first: the
    node-local pod's whole configuration (ConfigMap file, environment) loads, and every
    upstream has the central overlay's Service as its first mirror tier, with none of
    the upstream's credentials."""
    docs = render("node-local")
    settings, _ = _pod_settings(docs, _mirror_container(_pod_spec(docs)), tmp_path, monkeypatch)
    assert settings.max_size == parse_size("15GiB")  # the DaemonSet's variable still wins
    upstreams = settings.resolved_upstreams()
    assert {u.name for u in upstreams} >= {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
    name, namespace, port = _central_service_url()
    for upstream in upstreams:
        assert upstream.mirrors, f"{upstream.name} has no mirror tier"
        tier = upstream.mirrors[0]
        assert tier.name == "central"
        url = urlsplit(tier.url)
        assert url.scheme == "http"  # the central Service serves plain HTTP
        assert url.port == port
        # <service>.<namespace>.svc, optionally with the cluster domain after it.
        labels = (url.hostname or "").split(".")
        assert labels[:3] == [name, namespace, "svc"], tier.url
        assert labels[3:] in ([], ["cluster", "local"]), tier.url
        assert tier.username is None and tier.secret() is None
        assert tier.ca_bundle is None and not tier.insecure_skip_verify
    # Without the central overlay the tier fails fast, and is skipped this long.
    assert 10 <= settings.tier_backoff <= 300


@pytest.mark.usefixtures("no_mirror_env")
def test_node_local_settings_are_the_base_ones_plus_the_central_tier() -> None:
    """The chained settings file repeats base/mirror.yaml (one file per process): the
    two must differ only in the tiers, or a change to the base (an upstream, its
    credentials) would silently miss the nodes."""

    def without_tiers(settings: Settings) -> dict[str, Any]:
        values = settings.model_dump()
        del values["tier_backoff"]
        for upstream in values["upstreams"]:
            del upstream["mirrors"]
        return values

    base = Settings.model_validate(yaml.safe_load((K8S / "base" / "mirror.yaml").read_text()))
    chained = _config_settings(render("node-local"))
    assert without_tiers(chained) == without_tiers(base)
    assert all(u.mirrors for u in chained.upstreams)
    # The central mirror (and the sidecar) use the base settings: no tier, above all not
    # the central Service itself.
    for overlay in ("central", "sidecar"):
        assert not any(u.mirrors for u in _config_settings(render(overlay)).upstreams), overlay


@pytest.mark.usefixtures("no_mirror_env")
def test_node_local_init_container_writes_hosts_from_the_chained_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The containerd-hosts init container reads the same chained settings and runs
    as the kubelet would start it: containerd's fallback stays the registry (the node's
    containerd cannot resolve the central Service's name), its mirror the node's pod."""
    docs = render("node-local")
    pod = _pod_spec(docs)
    [init] = [c for c in pod["initContainers"] if c["name"] == "containerd-hosts"]
    _, env = _pod_settings(docs, init, tmp_path / "volumes", monkeypatch)
    monkeypatch.setenv("MIRROR_CONFIG", env["MIRROR_CONFIG"])  # how the command finds it
    certs = tmp_path / "certs.d"
    args = [expand(a, env) for a in init["args"]]
    args = [f"--dir={certs}" if a.startswith("--dir=") else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    found = {p.parent.name: tomllib.loads(p.read_text()) for p in certs.glob("*/hosts.toml")}
    assert set(found) == {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
    assert found["docker.io"]["server"] == "https://registry-1.docker.io"
    assert found["ghcr.io"]["server"] == "https://ghcr.io"
    for hosts in found.values():
        assert list(hosts["host"]) == ["http://192.0.2.7:29500"]


@pytest.mark.usefixtures("no_mirror_env")
def test_node_local_chaining_turns_off_with_one_line(tmp_path: Path) -> None:
    """Without the chain-to-central component (one line in the overlay), the node-local
    mirrors go straight to the registries, and the overlay still validates."""
    docs = render(overlay_without("node-local", "chain-to-central", tmp_path))
    for doc in docs:
        if doc["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    settings = _config_settings(docs)
    assert not any(u.mirrors for u in settings.upstreams)
    chained = _config_settings(render("node-local"))
    assert [u.name for u in settings.upstreams] == [u.name for u in chained.upstreams]
    assert _by_kind(docs, "DaemonSet")  # the rest of the overlay is all there


def test_sidecar_overlay_is_a_native_sidecar() -> None:
    pod = _pod_spec(render("sidecar"))
    mirror = _mirror_container(pod)
    assert mirror in pod["initContainers"]
    assert mirror["restartPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in mirror["env"]}
    assert env["MIRROR_LISTEN"] == "127.0.0.1:5000"
    # The kubelet probes from the node: a loopback listener needs exec probes.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mirror[probe]["exec"]["command"][:2] == ["mirror", "probe"]


def test_operator_resources_come_from_the_single_sources() -> None:
    docs = render("central")
    [rule] = _by_kind(docs, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts  # regenerate with components/monitoring/sync-rules.py
    spec = importlib.util.spec_from_file_location(
        "sync_rules", K8S / "components" / "monitoring" / "sync-rules.py"
    )
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    shipped = (K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text()
    assert sync.render() == shipped
    [dashboard] = [c for c in _by_kind(docs, "ConfigMap") if "mirror.json" in c["data"]]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    grafana_json = (ROOT / "grafana" / "dashboards" / "mirror.json").read_text()
    assert dashboard["data"]["mirror.json"] == grafana_json
    assert json.loads(dashboard["data"]["mirror.json"])["uid"] == "registry-mirror"
    [monitor] = _by_kind(docs, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    # The alert rules select job="mirror"; the operator would use the Service's name.
    assert {"targetLabel": "job", "replacement": "mirror"} in endpoint["relabelings"]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert 'up{job="mirror"} == 0' in exprs
    [service] = _by_kind(docs, "Service")
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


def test_prometheus_rule_spec_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    [rule] = _by_kind(render("node-local"), "PrometheusRule")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards),
# the checks that apply to these pods: the namespace's `enforce` label must admit them.
_BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_security_violations(pod: Doc, level: str) -> list[str]:
    if level == "privileged":
        return []
    problems = []
    containers = pod["containers"] + pod.get("initContainers", [])
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            problems.append(f"hostPath volume {volume['name']}")
        elif level == "restricted" and not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume type {kinds} of {volume['name']}")
    pod_context = pod.get("securityContext", {})
    for c in containers:
        context = c.get("securityContext", {})
        added = set(context.get("capabilities", {}).get("add", []))
        if context.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{c['name']}: hostPort")
        if not added <= _BASELINE_CAPS:
            problems.append(f"{c['name']}: adds {added - _BASELINE_CAPS}")
        if level != "restricted":
            continue
        merged = {**pod_context, **context}
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation")
        if merged.get("runAsNonRoot") is not True or merged.get("runAsUser") == 0:
            problems.append(f"{c['name']}: may run as root")
        seccomp = merged.get("seccompProfile", {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccomp {seccomp}")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{c['name']}: capabilities not dropped")
        if not added <= {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: adds {added}")
    return problems


@pytest.mark.parametrize(
    ("overlay", "name", "level"),
    [
        ("central", "registry-mirror", "restricted"),
        ("central-tls", "registry-mirror", "restricted"),
        ("sidecar", "registry-mirror-example", "restricted"),
        ("node-local", "registry-mirror-node", "privileged"),
    ],
)
def test_namespace_pod_security_admits_the_pods(overlay: str, name: str, level: str) -> None:
    docs = render(overlay)
    [namespace] = _by_kind(docs, "Namespace")
    assert namespace["metadata"]["name"] == name  # one each: applying one never resets another
    assert {d["metadata"].get("namespace") for d in docs if d is not namespace} == {name}
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == level
    assert pod_security_violations(_pod_spec(docs), level) == []


def test_node_local_really_needs_the_privileged_level() -> None:
    problems = pod_security_violations(_pod_spec(render("node-local")), "baseline")
    assert "hostPath volume cache" in problems
    assert "mirror: hostPort" in problems
