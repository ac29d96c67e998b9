"""deploy/kubernetes/components/auth-tls, in the central-tls overlay: the Certificate
validates against cert-manager's own schema, and the mirror pod, given its Secrets as
cert-manager and the kubelet give them, serves HTTPS for the Service's names, signs
users in from the htpasswd Secret and has its probes and /metrics on the admin port."""

from __future__ import annotations

import copy
import datetime as dt
import re
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

import bcrypt
import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness.kube import (
    Doc,
    container_env,
    local_paths,
    materialize_volumes,
    render,
    validate_custom,
)

from mirror.cli import main
from mirror.clientauth import Htpasswd, token_key
from mirror.config import Settings, host_port
from mirror.loading import check_usable, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
OVERLAY = "central-tls"


def _one(docs: list[Doc], kind: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def _mirror(docs: list[Doc]) -> tuple[Doc, Doc]:
    pod: Doc = _one(docs, "Deployment")["spec"]["template"]["spec"]
    [mirror] = [c for c in pod["containers"] if c["name"] == "mirror"]
    return pod, mirror


def _port(container: Doc, name: str) -> int:
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _mount_of(pod: Doc, container: Doc, secret_name: str) -> Doc:
    [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret_name]
    mounts: list[Doc] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    [mount] = mounts
    return mount


def _issue(certificate: Doc, now: dt.datetime) -> Doc:
    """The Secret cert-manager writes for `certificate` with a CA issuer: tls.crt (for
    its DNS names and usages), tls.key (its key algorithm and encoding) and ca.crt."""
    spec = certificate["spec"]
    assert spec["privateKey"]["algorithm"] == "ECDSA" and spec["privateKey"]["size"] == 256
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry-mirror-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    usages = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH}
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=int(spec["duration"].rstrip("h"))))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([usages[u] for u in spec["usages"] if u in usages]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    assert spec["privateKey"]["encoding"] == "PKCS8"
    pem = serialization.Encoding.PEM
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": spec["secretName"]},
        "stringData": {
            "tls.crt": leaf.public_bytes(pem).decode(),
            "tls.key": key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
            "ca.crt": ca.public_bytes(pem).decode(),
        },
    }


def _pod_settings(
    docs: list[Doc],
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    pod_ip: str = "10.0.0.7",
    secrets: dict[str, str] | None = None,
) -> Settings:
    """The mirror container's settings as the kubelet starts it, with the TLS Secret
    cert-manager would have written by then."""
    docs = [*docs, _issue(_one(docs, "Certificate"), dt.datetime.now(dt.UTC))]
    pod, mirror = _mirror(docs)
    mounted = materialize_volumes(pod, mirror, docs, root, secrets=secrets)
    env = local_paths(container_env(mirror, docs, pod_ip=pod_ip), mounted)
    config = Path(env.pop("MIRROR_CONFIG"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(config)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> ssl.SSLObject:
    """A TLS handshake in memory; returns the client's side (raises if it fails)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    near = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    far = server.wrap_bio(s_in, s_out, server_side=True)
    done = {id(near): False, id(far): False}
    for _ in range(10):
        for side in (near, far):
            if not done[id(side)]:
                try:
                    side.do_handshake()
                    done[id(side)] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return near
    raise AssertionError("the handshake did not finish")


# -- the Certificate against cert-manager's schema ------------------------------------


def test_certificate_validates_against_cert_managers_schema() -> None:
    certificate = _one(render(OVERLAY), "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    validate_custom(certificate)


def _misspelt(spec: Doc) -> None:
    spec["dnsName"] = spec.pop("dnsNames")


def _no_secret_name(spec: Doc) -> None:
    del spec["secretName"]


def _no_issuer(spec: Doc) -> None:
    del spec["issuerRef"]


def _issuer_without_name(spec: Doc) -> None:
    del spec["issuerRef"]["name"]


def _old_api_key_algorithm(spec: Doc) -> None:
    spec["privateKey"]["algorithm"] = "ecdsa"  # v1alpha2's spelling


def _unknown_usage(spec: Doc) -> None:
    spec["usages"] = ["server-auth"]


def _duration_as_number(spec: Doc) -> None:
    spec["duration"] = 2160


@pytest.mark.parametrize(
    "mistake",
    [
        pytest.param(_misspelt, id="misspelt-field"),
        pytest.param(_no_secret_name, id="no-secretName"),
        pytest.param(_no_issuer, id="no-issuerRef"),
        pytest.param(_issuer_without_name, id="issuerRef-without-name"),
        pytest.param(_old_api_key_algorithm, id="enum"),
        pytest.param(_unknown_usage, id="unknown-usage"),
        pytest.param(_duration_as_number, id="wrong-type"),
    ],
)
def test_certificate_validation_would_catch_a_mistake(mistake: Callable[[Doc], None]) -> None:
    broken = copy.deepcopy(_one(render(OVERLAY), "Certificate"))
    mistake(broken["spec"])
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(broken)


# -- how the pieces fit ---------------------------------------------------------------


def test_certificate_names_the_service_and_feeds_the_pod() -> None:
    """The certificate covers every name the Service has in the cluster, and its
    Secret is mounted whole (never by subPath, which the kubelet does not update), so a
    renewal reaches the mirror without a restart; the htpasswd Secret likewise."""
    docs = render(OVERLAY)
    certificate, service = _one(docs, "Certificate"), _one(docs, "Service")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert certificate["metadata"]["namespace"] == namespace
    assert {
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    } <= set(certificate["spec"]["dnsNames"])
    assert "server auth" in certificate["spec"]["usages"]
    pod, mirror = _mirror(docs)
    env = {e["name"]: e.get("value") for e in mirror["env"]}
    tls = _mount_of(pod, mirror, certificate["spec"]["secretName"])
    assert env["MIRROR_TLS_CERT_FILE"] == f"{tls['mountPath']}/tls.crt"
    assert env["MIRROR_TLS_KEY_FILE"] == f"{tls['mountPath']}/tls.key"
    htpasswd = _mount_of(pod, mirror, "registry-mirror-htpasswd")
    assert env["MIRROR_AUTH_HTPASSWD"] == f"{htpasswd['mountPath']}/htpasswd"
    for mount in (tls, htpasswd):
        assert "subPath" not in mount and mount["readOnly"] is True
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    # The example htpasswd Secret is in the overlay, with a placeholder and no user.
    [example] = [
        d
        for d in docs
        if d["kind"] == "Secret" and d["metadata"]["name"] == "registry-mirror-htpasswd"
    ]
    assert "REPLACE-ME" in example["stringData"]["htpasswd"]


def test_clients_use_443_and_prometheus_the_admin_port() -> None:
    """The Service serves HTTPS on 443 (to the pods' registry port) and the admin port
    for the ServiceMonitor; the kubelet probes the admin port, which is plain HTTP."""
    docs = render(OVERLAY)
    _, mirror = _mirror(docs)
    ports = {p["name"]: p for p in _one(docs, "Service")["spec"]["ports"]}
    assert set(ports) == {"https", "admin"}  # nothing plain left on the registry side
    assert (ports["https"]["port"], ports["https"]["targetPort"]) == (443, "https")
    assert ports["admin"]["targetPort"] == "admin"
    names = {p["name"] for p in mirror["ports"]}
    assert names == {"https", "admin"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mirror[probe]["httpGet"]["port"] == "admin"
        assert mirror[probe]["httpGet"].get("scheme", "HTTP") == "HTTP"
    [endpoint] = _one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    # Peers use the admin port (plain HTTP on the pod network, behind the peer secret);
    # POD_IP is still defined before the peer URL that uses it.
    env = container_env(mirror, docs, pod_ip="10.0.0.7")
    assert env["MIRROR_PEER_URL"] == f"http://10.0.0.7:{_port(mirror, 'admin')}"


# -- the pod's configuration, as the kubelet gives it (needs the `tls` settings) ------


@pytest.mark.usefixtures("no_mirror_env")
def test_central_tls_pod_serves_https_for_the_service_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's whole configuration loads: TLS from cert-manager's Secret files (a
    client trusting the issuer's CA verifies the Service's name), the admin listener on
    the port the probes use, the users from the htpasswd Secret, no anonymous pulls."""
    from mirror.tls import server_tls

    docs = render(OVERLAY)
    _, mirror = _mirror(docs)
    settings = _pod_settings(docs, tmp_path, monkeypatch)
    check_usable(settings)
    assert settings.scheme == "https"
    assert host_port(settings.listen)[1] == _port(mirror, "https")
    assert settings.admin_listen is not None
    assert host_port(settings.admin_listen)[1] == _port(mirror, "admin")
    assert settings.tls_client_ca is None  # mTLS is off in the example
    assert settings.peer_url == f"http://10.0.0.7:{_port(mirror, 'admin')}"
    tls = server_tls(settings)
    assert tls is not None
    assert settings.tls_cert_file is not None
    ca = settings.tls_cert_file.with_name("ca.crt")
    client = ssl.create_default_context(cafile=str(ca))
    for name in _one(docs, "Certificate")["spec"]["dnsNames"]:
        assert _handshake(tls.context, client, name).version() in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls.context, client, "mirror.elsewhere.example")
    # The example Secret holds no user: every client is refused until one is added.
    assert settings.credentials_configured() and not settings.anonymous_allowed()
    assert settings.auth_htpasswd is not None
    assert Htpasswd(settings.auth_htpasswd).entry("alice") is None


@pytest.mark.usefixtures("no_mirror_env")
def test_users_from_the_htpasswd_secret_sign_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Secret made as docs/deploy.md says (`mirror auth htpasswd`, then
    --from-file=htpasswd) gives the mirror that user, with that password."""
    made = CliRunner().invoke(main, ["auth", "htpasswd", "alice"], input="correct horse\n")
    assert made.exit_code == 0, made.output
    settings = _pod_settings(
        render(OVERLAY), tmp_path, monkeypatch, secrets={"htpasswd": made.output}
    )
    assert settings.auth_htpasswd is not None
    entry = Htpasswd(settings.auth_htpasswd).entry("alice")
    assert entry is not None and bcrypt.checkpw(b"correct horse", entry)
    assert not bcrypt.checkpw(b"wrong", entry)


@pytest.mark.usefixtures("no_mirror_env")
def test_replicas_share_the_realm_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without auth_token_key_file, the replicas derive the realm's key from the peer
    secret they share: a token one replica issues is valid at the others."""
    docs = render(OVERLAY)
    keys = []
    for number, pod_ip in enumerate(("10.0.0.7", "10.0.0.8")):
        settings = _pod_settings(docs, tmp_path / str(number), monkeypatch, pod_ip=pod_ip)
        assert settings.auth_token_key_file is None and settings.store == "s3"
        keys.append(token_key(settings, settings.shared_secrets().peer_secret))
    assert keys[0] == keys[1] and len(keys[0]) >= 32


@pytest.mark.usefixtures("no_mirror_env")
def test_mtls_turns_on_by_uncommenting_its_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commented mTLS lines of the component's deployment.yaml, uncommented, give a
    pod that checks client certificates against the issuer's CA (ca.crt)."""
    tree = tmp_path / "repo"
    shutil.copytree(ROOT / "deploy" / "kubernetes", tree / "deploy" / "kubernetes")
    shutil.copytree(ROOT / "grafana", tree / "grafana")  # the monitoring component's
    patch = tree / "deploy" / "kubernetes" / "components" / "auth-tls" / "deployment.yaml"
    lines = patch.read_text().splitlines()
    toggled = [
        line.replace("# ", "", 1) if "MIRROR_TLS_CLIENT" in line or "#   value:" in line else line
        for line in lines
    ]
    assert sum(a != b for a, b in zip(lines, toggled, strict=True)) == 4
    patch.write_text("\n".join(toggled) + "\n")
    docs = render(tree / "deploy" / "kubernetes" / "overlays" / OVERLAY)
    settings = _pod_settings(docs, tmp_path / "volumes", monkeypatch)
    assert settings.tls_client_ca is not None and settings.tls_cert_file is not None
    assert settings.tls_client_ca == settings.tls_cert_file.with_name("ca.crt")
    assert settings.tls_client_auth == "optional"


@pytest.mark.usefixtures("no_mirror_env")
def test_docs_rules_example_loads_with_the_base_settings() -> None:
    """docs/deploy.md's robots-and-rules example, with the entry `mirror auth token`
    prints pasted in, is valid next to base/mirror.yaml's upstreams."""
    made = CliRunner().invoke(main, ["auth", "token", "ci-robot", "--group", "ci"])
    assert made.exit_code == 0, made.output
    [entry] = yaml.safe_load(made.stderr.split("add to the settings file:", 1)[1])["auth_tokens"]
    section = (ROOT / "docs" / "deploy.md").read_text().split("## Authentication and TLS")[1]
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if "auth_tokens" in b]
    example = yaml.safe_load(re.sub(r"^ {3}", "", block, flags=re.M))
    [robot] = example["auth_tokens"]
    assert robot["name"] == entry["name"] and robot["groups"] == entry["groups"]
    robot["sha256"] = entry["sha256"]
    base = yaml.safe_load((K8S / "base" / "mirror.yaml").read_text())
    settings = Settings.model_validate({**base, **example})
    assert settings.access and settings.credentials_configured()
