"""Signatures and SBOMs through the mirror, against the real Distribution registry.

Artifacts with a `subject` are pushed with oras-py, a client users use. Distribution
2.8 has no referrers API, so the pusher also maintains the spec's referrers tag
(`sha256-<hex>`, an index of the referrers), as clients do for such registries; the
mirror then answers the referrers API from that tag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RealUpstream
from harness import OCI_INDEX, OCI_MANIFEST
from harness.images import fetch_token, registry_get, sha256_digest
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

SIGNATURE = "application/vnd.example.signature.v1+json"
SBOM = "application/spdx+json"
SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
PUSHER = ("pusher", "pushpass")
EMPTY = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


@dataclass(frozen=True)
class Artifact:
    digest: str
    manifest: bytes
    payload: bytes

    @property
    def descriptor(self) -> dict[str, Any]:
        document = json.loads(self.manifest)
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.digest,
            "size": len(self.manifest),
            # The spec: artifactType, else the config's media type.
            "artifactType": document.get("artifactType") or document["config"]["mediaType"],
        }

    @property
    def blobs(self) -> list[str]:
        document = json.loads(self.manifest)
        return [document["config"]["digest"], *(x["digest"] for x in document["layers"])]


@dataclass(frozen=True)
class Signed:
    repo: str
    subject: str  # the image's digest
    signature: Artifact
    sbom: Artifact
    cosign_tag: str  # `sha256-<hex>.sig`
    cosign: Artifact


def _oras_push(
    real: RealUpstream,
    workdir: Path,
    repo: str,
    tag: str,
    payload: bytes,
    layer_type: str,
    config_type: str,
    subject: tuple[str, str, int] | None,
) -> Artifact:
    import oras.oci
    import oras.provider

    host = real.registry.host
    client = oras.provider.Registry(hostname=host, insecure=True)
    client.auth.set_basic_auth(*PUSHER)
    name = f"{tag}.payload"
    (workdir / name).write_bytes(payload)
    cwd = os.getcwd()
    os.chdir(workdir)  # oras-py takes files relative to the working directory only
    try:
        client.push(
            f"{host}/{repo}:{tag}",
            files=[f"{name}:{layer_type}"],
            manifest_config=f"/dev/null:{config_type}",
            subject=oras.oci.Subject(*subject) if subject else None,
        )
    finally:
        os.chdir(cwd)
    # What the registry stores, not what was meant to be pushed.
    token = fetch_token(real.tokens, repo, creds=PUSHER)
    status, _, body = registry_get(real.registry, f"/v2/{repo}/manifests/{tag}", token)
    assert status == 200, body
    return Artifact(sha256_digest(body), body, payload)


def _put_referrers_tag(real: RealUpstream, repo: str, subject: str, listed: list[Artifact]) -> None:
    """The referrers tag schema's index, as a client pushing to Distribution keeps it."""
    token = fetch_token(real.tokens, repo, "pull,push", creds=PUSHER)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [a.descriptor for a in listed],
    }
    r = httpx.put(
        f"{real.registry.url}/v2/{repo}/manifests/{subject.replace(':', '-')}",
        content=json.dumps(index).encode(),
        headers={"Content-Type": OCI_INDEX, "Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def signed(real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory) -> Signed:
    image = real_upstream.images["oci"]
    workdir = tmp_path_factory.mktemp("artifacts")
    subject = (image.media_type, image.digest, len(image.manifest))
    sig = _oras_push(
        real_upstream,
        workdir,
        image.repo,
        "sig",
        b'{"critical":{"type":"sig"}}',
        SIMPLESIGNING,
        SIGNATURE,
        subject,
    )
    sbom = _oras_push(
        real_upstream,
        workdir,
        image.repo,
        "sbom",
        b'{"spdxVersion":"SPDX-2.3"}',
        SBOM,
        SBOM,
        subject,
    )
    _put_referrers_tag(real_upstream, image.repo, image.digest, [sig, sbom])
    cosign_tag = image.digest.replace(":", "-") + ".sig"
    cosign = _oras_push(
        real_upstream,
        workdir,
        image.repo,
        cosign_tag,
        b'{"critical":{"type":"cosign"}}',
        SIMPLESIGNING,
        "application/vnd.oci.image.config.v1+json",
        None,
    )
    return Signed(image.repo, image.digest, sig, sbom, cosign_tag, cosign)


@pytest.fixture
def mirror(real_upstream: RealUpstream, tmp_path: Path) -> Iterator[MirrorProcess]:
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as process:
        yield process


def _referrers(mirror: MirrorProcess, repo: str, digest: str, **params: str) -> httpx.Response:
    return httpx.get(f"{mirror.url}/v2/{repo}/referrers/{digest}", params=params)


def test_referrers_listed_filtered_and_fetched_through_the_mirror(
    real_upstream: RealUpstream, signed: Signed, mirror: MirrorProcess
) -> None:
    real_upstream.registry.clear_log()
    r = _referrers(mirror, signed.repo, signed.subject)
    # Distribution has no referrers API (404): the mirror read the referrers tag.
    asked = real_upstream.registry.wait_for_request(lambda e: "/referrers/" in e.path)
    assert asked.status == 404
    tag = f"/v2/{signed.repo}/manifests/{signed.subject.replace(':', '-')}"
    real_upstream.registry.wait_for_request(lambda e: e.path == tag and e.status == 200)
    assert (r.status_code, r.headers["content-type"]) == (200, OCI_INDEX)
    assert r.json()["manifests"] == [signed.signature.descriptor, signed.sbom.descriptor]
    assert "oci-filters-applied" not in r.headers

    only = _referrers(mirror, signed.repo, signed.subject, artifactType=SBOM)
    assert only.json()["manifests"] == [signed.sbom.descriptor]
    assert only.headers["oci-filters-applied"] == "artifactType"
    assert only.headers["x-cache"] == "HIT"

    # Each referrer, and its blobs, by digest through the mirror: verified bytes.
    for artifact in (signed.signature, signed.sbom):
        got = httpx.get(
            f"{mirror.url}/v2/{signed.repo}/manifests/{artifact.digest}",
            headers={"Accept": OCI_MANIFEST},
        )
        assert (got.status_code, got.content) == (200, artifact.manifest)
        layer = httpx.get(f"{mirror.url}/v2/{signed.repo}/blobs/{artifact.blobs[-1]}")
        assert (layer.status_code, layer.content) == (200, artifact.payload)


def test_a_digest_without_referrers_is_an_empty_index(
    real_upstream: RealUpstream, signed: Signed, mirror: MirrorProcess
) -> None:
    other = real_upstream.images["index"]
    r = _referrers(mirror, other.repo, other.digest)
    assert (r.status_code, r.headers["content-type"], r.json()) == (200, OCI_INDEX, EMPTY)
    # The signature itself is signed by nothing.
    r = _referrers(mirror, signed.repo, signed.signature.digest, artifactType=SIGNATURE)
    assert (r.status_code, r.json()) == (200, EMPTY)


def test_cached_referrers_are_served_stale_with_the_upstream_stopped(
    real_upstream: RealUpstream, signed: Signed, tmp_path: Path
) -> None:
    env = {"MIRROR_TAG_TTL": "0"}  # every request goes to the upstream first
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env) as mirror:
        first = _referrers(mirror, signed.repo, signed.subject)
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        real_upstream.registry.stop()
        try:
            stale = _referrers(mirror, signed.repo, signed.subject, artifactType=SIGNATURE)
            assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
            assert stale.json()["manifests"] == [signed.signature.descriptor]
        finally:
            real_upstream.registry.start()


def test_a_cosign_style_sig_tag_is_pulled_through_with_skopeo(
    signed: Signed, mirror: MirrorProcess, tmp_path: Path
) -> None:
    host = mirror.url.removeprefix("http://")
    layout = tmp_path / "layout"
    copied = skopeo_copy(f"docker://{host}/{signed.repo}:{signed.cosign_tag}", f"oci:{layout}:sig")
    assert copied.returncode == 0, copied.stderr
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == signed.cosign.digest
    blobs = layout / "blobs" / "sha256"
    assert (blobs / signed.cosign.digest.split(":")[1]).read_bytes() == signed.cosign.manifest
    payload = signed.cosign.blobs[-1].split(":")[1]
    assert (blobs / payload).read_bytes() == signed.cosign.payload


def test_warm_with_referrers_then_the_upstream_stopped(
    real_upstream: RealUpstream, signed: Signed, mirror: MirrorProcess
) -> None:
    image = real_upstream.images["oci"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirror",
            "warm",
            "--with-referrers",
            image.reference,
            "--mirror",
            mirror.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (
        f"{image.reference}: 2 referrers, 1 cosign tags: {signed.signature.digest}, "
        f"{signed.sbom.digest}, {signed.cosign_tag}"
    ) in run.stdout
    real_upstream.registry.stop()
    try:
        r = _referrers(mirror, signed.repo, signed.subject)
        assert (r.status_code, r.headers["x-cache"]) == (200, "HIT")
        assert r.json()["manifests"] == [signed.signature.descriptor, signed.sbom.descriptor]
        for artifact in (signed.signature, signed.sbom):
            got = httpx.get(
                f"{mirror.url}/v2/{signed.repo}/manifests/{artifact.digest}",
                headers={"Accept": OCI_MANIFEST},
            )
            assert (got.status_code, got.headers["x-cache"]) == (200, "HIT")
            for blob in artifact.blobs:
                b = httpx.get(f"{mirror.url}/v2/{signed.repo}/blobs/{blob}")
                assert (b.status_code, b.headers["x-cache"]) == (200, "HIT"), blob
    finally:
        real_upstream.registry.start()
