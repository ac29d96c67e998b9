"""The Kubernetes manifests as a cluster would run them, without a cluster: kustomize's
rendering, and what the kubelet gives a container (its environment, with `valueFrom`
and `$(VAR)` references resolved, and its configMap and secret volumes as files)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import require_tool

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "kubernetes" / "overlays"
SCHEMAS = ROOT / "tests" / "schemas"
# Custom resources validated against their CRD's vendored schema (kubernetes-validate
# knows only the built-in kinds): (apiVersion, kind) -> file under tests/schemas.
CUSTOM_SCHEMAS = {("cert-manager.io/v1", "Certificate"): "cert-manager-certificate-v1.yaml"}

Doc = dict[str, Any]

# The kubelet expands $(VAR) from variables defined earlier in the list; $$ escapes.
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_QUANTITY_UNITS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def render(overlay: str | Path) -> list[Doc]:
    """`kubectl kustomize` of an overlay (its name, or a directory), as documents."""
    kubectl = require_tool("kubectl")
    path = overlay if isinstance(overlay, Path) else OVERLAYS / overlay
    result = subprocess.run(
        [kubectl, "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def overlay_without(overlay: str, component: str, root: Path) -> Path:
    """A copy of the overlay under `root` with one of its components removed, as a user
    who deleted that line would have it. The directories it names (the base, the other
    components) are the repository's own."""
    source = OVERLAYS / overlay
    copy = root / overlay
    shutil.copytree(source, copy)
    kustomization = yaml.safe_load((source / "kustomization.yaml").read_text())
    components = kustomization.get("components", [])
    kept = [c for c in components if Path(c).name != component]
    assert len(kept) == len(components) - 1, f"{overlay} has no component {component}"
    kustomization["components"] = kept
    for key in ("resources", "components"):
        kustomization[key] = [
            # Relative: kustomize takes no absolute directory as a root.
            os.path.relpath((source / entry).resolve(), copy)
            if (source / entry).is_dir()
            else entry
            for entry in kustomization.get(key, [])
        ]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return copy


def strict_schema(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field
    validation (kubectl's default): a field no `properties` names is an error, where
    plain JSON Schema would let it through (and the server would prune it)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: strict_schema(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def validate_custom(doc: Doc) -> None:
    """Validate a custom resource against its CRD's vendored schema; raises
    `jsonschema.ValidationError` naming the first problem."""
    name = CUSTOM_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    schema = strict_schema(yaml.safe_load((SCHEMAS / name).read_text()))
    jsonschema.validate(doc, schema, cls=jsonschema.Draft4Validator)


def quantity(value: str) -> int:
    """A Kubernetes quantity in bytes: `20Gi`, `64Mi`, `1G` (the forms used here)."""
    m = _QUANTITY.fullmatch(value)
    assert m is not None, f"unsupported quantity {value!r}"
    return int(m[1]) * _QUANTITY_UNITS[m[2]]


def secret_data(secret: Doc) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return {**data, **secret.get("stringData", {})}


def _named(docs: list[Doc], kind: str, name: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def expand(value: str, env: dict[str, str]) -> str:
    """`$(VAR)` references in a value, an argument or a command, as the kubelet expands
    them from the container's environment (`$$` is a `$`)."""

    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        return env.get(m[1], m[0])  # an undefined reference stays as written

    return _REFERENCE.sub(one, value)


def container_env(
    container: Doc,
    docs: list[Doc],
    *,
    pod_ip: str,
    host_ip: str | None = None,
    secrets: dict[str, str] | None = None,
) -> dict[str, str]:
    """The container's `env`, resolved as the kubelet does: values, the pod and node
    IPs, secret and configMap keys from `docs` (`secrets` overrides a Secret's values
    by key), and `$(VAR)` references to earlier variables."""
    env: dict[str, str] = {}
    fields = {"status.podIP": pod_ip, "status.hostIP": host_ip}
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            value = fields.get(path)
            assert value is not None, f"{name}: unsupported or unset fieldRef {path}"
            env[name] = value
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            values = secret_data(_named(docs, "Secret", ref["name"]))
            env[name] = (secrets or {}).get(ref["key"], values[ref["key"]])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[name] = _named(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            raise AssertionError(f"{name}: unsupported valueFrom {source}")
    return env


def materialize_volumes(
    pod: Doc, container: Doc, docs: list[Doc], root: Path, *, secrets: dict[str, str] | None = None
) -> dict[str, Path]:
    """Write the container's configMap and secret volumes under `root`, one directory
    per volume, one file per key (`secrets` overrides a Secret's values by key).
    Returns {mount path in the container: directory here}."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            files = dict(_named(docs, "ConfigMap", volume["configMap"]["name"])["data"])
        elif "secret" in volume:
            files = secret_data(_named(docs, "Secret", volume["secret"]["secretName"]))
            files.update({k: v for k, v in (secrets or {}).items() if k in files})
        else:
            continue
        directory = root / mount["name"]
        directory.mkdir(parents=True)
        for key, text in files.items():
            (directory / key).write_text(text)
        mounted[mount["mountPath"]] = directory
    return mounted


def local_paths(env: dict[str, str], mounted: dict[str, Path]) -> dict[str, str]:
    """`env` with every value under a materialized mount pointing at its copy here."""
    resolved = {}
    for name, value in env.items():
        for mount, directory in mounted.items():
            if value.startswith(mount.rstrip("/") + "/"):
                value = str(directory / value[len(mount.rstrip("/")) + 1 :])
        resolved[name] = value
    return resolved
