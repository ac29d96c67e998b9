"""The private-digest test (issue 16): content cached from a private upstream is not
served by digest through another upstream's name, nor through a repository of the
same upstream that the mirror's credentials cannot read; content that upstream does
hold is served from the cache after one HEAD, never downloaded again.

Two real Distribution registries with token auth: `private.test` (pulls need the
mirror's credentials; its token service grants them nothing on `vault/app`) and
`public.test` (the first test registry, anonymous pulls, no credentials configured).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import OCI_MANIFEST, Layout, LoggedRequest, Registry, TestImage, TokenServer, push
from harness.images import read_back
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

MIRROR_CREDS = ("mirror", "m-secret")
PUSHER = ("pushp", "pushp-pass")


@dataclass
class Private:
    tokens: TokenServer
    registry: Registry
    secret: TestImage  # team/secret:1, only on the private registry (also vault/app:1)
    shared: TestImage  # team/shared:1, byte for byte the public registry's oci image


@pytest.fixture(scope="module")
def private(
    real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Private]:
    workdir = tmp_path_factory.mktemp("private")
    users = dict([MIRROR_CREDS, PUSHER])
    with (
        TokenServer(
            workdir,
            users=users,
            issuer="auth.private.test",
            service="private",
            anonymous_pull=False,
        ) as tokens,
        Registry(workdir / "registry", tokens) as registry,
    ):
        layout = Layout(workdir / "layout")
        image = layout.image([[("etc/secret", b"a private layer\n" * 64)]])
        layout.tag(image, "secret")
        secret = push(layout.root, "secret", registry, "team/secret", "1", creds=PUSHER)
        assert push(layout.root, "secret", registry, "vault/app", "1", creds=PUSHER) == secret
        public_layout = real_upstream.workdir / "layout"
        shared = push(public_layout, "oci", registry, "team/shared", "1", creds=PUSHER)
        assert shared == real_upstream.images["oci"].digest
        tokens.denied.add((MIRROR_CREDS[0], "vault/app"))  # the mirror may not read it
        yield Private(
            tokens,
            registry,
            read_back(registry, "team/secret", "1", secret, PUSHER),
            read_back(registry, "team/shared", "1", shared, PUSHER),
        )


def _env(real_upstream: RealUpstream, private: Private) -> dict[str, str]:
    upstreams = [
        {
            "name": "private.test",
            "url": private.registry.url,
            "username": MIRROR_CREDS[0],
            "password_env": "TEST_PRIVATE_PASSWORD",
            "path_prefix": "private",
        },
        {"name": "public.test", "url": real_upstream.registry.url},
    ]
    return {
        "MIRROR_UPSTREAMS": json.dumps(upstreams),
        "MIRROR_DEFAULT_UPSTREAM": "public.test",
        "TEST_PRIVATE_PASSWORD": MIRROR_CREDS[1],
    }


def _pull(mirror: MirrorProcess, image: TestImage, into: Path) -> None:
    ref = f"docker://{mirror.host}/private/{image.repo}:{image.tag}"
    result = skopeo_copy(ref, f"dir:{into}")
    assert result.returncode == 0, result.stderr


def _get(mirror: MirrorProcess, path: str, ns: str, method: str = "GET") -> httpx.Response:
    headers = {"Accept": OCI_MANIFEST}
    return httpx.request(
        method, f"{mirror.url}{path}", params={"ns": ns}, headers=headers, timeout=30
    )


def _head_of(path: str) -> Callable[[LoggedRequest], bool]:
    return lambda r: r.method == "HEAD" and r.path.startswith(path)


def _refused(resp: httpx.Response, code: str, secret: bytes) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.json()["errors"][0]["code"] == code
    assert secret not in resp.content


def test_private_content_is_not_served_through_the_public_upstreams_name(
    real_upstream: RealUpstream, private: Private, tmp_path: Path
) -> None:
    secret = private.secret
    layer = secret.layer_digests[-1]
    public_repo = real_upstream.images["oci"].repo  # exists there, without this layer
    with MirrorProcess(tmp_path / "m", None, env=_env(real_upstream, private)) as mirror:
        _pull(mirror, secret, tmp_path / "pulled")
        layer_bytes = (tmp_path / "pulled" / layer.removeprefix("sha256:")).read_bytes()
        real_upstream.registry.clear_log()
        blob = _get(mirror, f"/v2/{public_repo}/blobs/{layer}", "public.test")
        _refused(blob, "BLOB_UNKNOWN", layer_bytes)
        head = _get(mirror, f"/v2/{public_repo}/blobs/{layer}", "public.test", "HEAD")
        assert (head.status_code, head.content) == (404, b"")
        manifest = _get(mirror, f"/v2/{public_repo}/manifests/{secret.digest}", "public.test")
        _refused(manifest, "MANIFEST_UNKNOWN", secret.manifest)
        # The public registry was asked, with HEADs only, and said no.
        for path in (f"/v2/{public_repo}/blobs/{layer}", f"/v2/{public_repo}/manifests/"):
            real_upstream.registry.wait_for_request(_head_of(path))
        assert {r.method for r in real_upstream.registry.requests() if r.path != "/v2/"} == {"HEAD"}
        # Still served to the private upstream's own repository, from the cache.
        own = _get(mirror, f"/v2/{secret.repo}/blobs/{layer}", "private.test")
        assert (own.status_code, own.headers["x-cache"]) == (200, "HIT")
        assert (
            mirror.metric("mirror_scope_checks_total", upstream="public.test", result="refused")
            == 3
        )


def test_a_repository_the_mirrors_credentials_cannot_read_gets_a_404(
    real_upstream: RealUpstream, private: Private, tmp_path: Path
) -> None:
    secret = private.secret
    layer = secret.layer_digests[-1]
    with MirrorProcess(tmp_path / "m", None, env=_env(real_upstream, private)) as mirror:
        _pull(mirror, secret, tmp_path / "pulled")
        layer_bytes = (tmp_path / "pulled" / layer.removeprefix("sha256:")).read_bytes()
        private.tokens.clear()
        blob = _get(mirror, f"/v2/vault/app/blobs/{layer}", "private.test")
        _refused(blob, "BLOB_UNKNOWN", layer_bytes)
        manifest = _get(mirror, f"/v2/vault/app/manifests/{secret.digest}", "private.test")
        _refused(manifest, "MANIFEST_UNKNOWN", secret.manifest)
        # The mirror asked for vault/app with its own credentials, and got nothing.
        asked = [r for r in private.tokens.requests if "repository:vault/app:pull" in r.scopes]
        assert asked and {r.user for r in asked} == {MIRROR_CREDS[0]}


def test_content_the_public_upstream_holds_too_is_served_after_one_head(
    real_upstream: RealUpstream, private: Private, tmp_path: Path
) -> None:
    shared = private.shared
    public = real_upstream.images["oci"]
    layer = shared.layer_digests[-1]
    assert layer in public.layer_digests
    with MirrorProcess(tmp_path / "m", None, env=_env(real_upstream, private)) as mirror:
        _pull(mirror, shared, tmp_path / "pulled")
        layer_bytes = (tmp_path / "pulled" / layer.removeprefix("sha256:")).read_bytes()
        real_upstream.registry.clear_log()
        for _ in range(2):  # one HEAD, then remembered
            resp = _get(mirror, f"/v2/{public.repo}/blobs/{layer}", "public.test")
            assert (resp.status_code, resp.headers["x-cache"]) == (200, "HIT")
            assert resp.content == layer_bytes
        real_upstream.registry.wait_for_request(
            lambda r: r.method == "HEAD" and r.path == f"/v2/{public.repo}/blobs/{layer}"
        )
        blob_requests = [r for r in real_upstream.registry.requests() if "/blobs/" in r.path]
        assert [r.method for r in blob_requests if r.status < 400] == ["HEAD"]
        assert (
            mirror.metric("mirror_scope_checks_total", upstream="public.test", result="confirmed")
            == 1
        )
