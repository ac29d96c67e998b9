from __future__ import annotations

import pytest

from mirror.errors import RegistryError
from mirror.reference import Digest, Reference, parse_path, validate_name

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("alpine", id="single"),
        pytest.param("library/alpine", id="two"),
        pytest.param("a/b/c/d", id="deep"),
        pytest.param("my-org/my_app.v2", id="separators"),
        pytest.param("a__b/c---d", id="double-underscore-and-dashes"),
        pytest.param("x" * 255, id="max-length"),
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("Alpine", id="uppercase"),
        pytest.param("../etc", id="dotdot"),
        pytest.param("a/../b", id="dotdot-inside"),
        pytest.param("%2e%2e/x", id="percent-escaped"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a//b", id="empty-component"),
        pytest.param("/a", id="leading-slash"),
        pytest.param("a/", id="trailing-slash"),
        pytest.param("-a", id="leading-dash"),
        pytest.param("a_-b", id="mixed-separator"),
        pytest.param("x" * 256, id="too-long"),
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as err:
        validate_name(name)
    assert err.value.code == "NAME_INVALID"
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        pytest.param(SHA256, True, id="sha256"),
        pytest.param(SHA512, True, id="sha512"),
        pytest.param("sha256:" + "A" * 64, False, id="uppercase-hex"),
        pytest.param("sha256:" + "a" * 63, False, id="short"),
        pytest.param("sha256:" + "a" * 65, False, id="long"),
        pytest.param("sha512:" + "a" * 64, False, id="sha512-wrong-length"),
        pytest.param("md5:" + "a" * 32, False, id="unsupported-algorithm"),
        pytest.param("sha256:../../etc/passwd", False, id="traversal"),
        pytest.param("sha256", False, id="no-colon"),
        pytest.param(":abc", False, id="no-algorithm"),
    ],
)
def test_digests(text: str, ok: bool) -> None:
    if ok:
        assert str(Digest.parse(text)) == text
    else:
        with pytest.raises(RegistryError) as err:
            Digest.parse(text)
        assert err.value.code == "DIGEST_INVALID"


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        pytest.param("latest", "latest", id="latest"),
        pytest.param("v1.2.3-rc_1", "v1.2.3-rc_1", id="version"),
        pytest.param("_x", "_x", id="leading-underscore"),
        pytest.param("a" * 128, "a" * 128, id="max"),
    ],
)
def test_valid_tags(text: str, tag: str) -> None:
    assert Reference.parse(text).tag == tag


@pytest.mark.parametrize(
    "text", [".INVALID_MANIFEST_NAME", ".x", "-x", "a" * 129, "a/b", "a b", "ä"]
)
def test_a_reference_that_is_no_tag_names_no_manifest(text: str) -> None:
    # The OCI conformance suite asks for `.INVALID_MANIFEST_NAME` and expects 404.
    with pytest.raises(RegistryError) as err:
        Reference.parse(text)
    assert (err.value.code, err.value.status) == ("MANIFEST_UNKNOWN", 404)


@pytest.mark.parametrize("text", ["sha256:totallywrong", "sha256:" + "A" * 64, "md5:abc"])
def test_a_malformed_digest_reference_is_a_client_error(text: str) -> None:
    with pytest.raises(RegistryError) as err:
        Reference.parse(text)
    assert (err.value.code, err.value.status) == ("DIGEST_INVALID", 400)


@pytest.mark.parametrize(
    ("rest", "name", "kind", "route"),
    [
        ("a/b/c/manifests/latest", "a/b/c", "manifests", "/v2/{name}/manifests/{reference}"),
        (f"alpine/manifests/{SHA256}", "alpine", "manifests", "/v2/{name}/manifests/{reference}"),
        (f"x/blobs/{SHA512}", "x", "blobs", "/v2/{name}/blobs/{digest}"),
        ("a/b/tags/list", "a/b", "tags", "/v2/{name}/tags/list"),
        (f"a/b/referrers/{SHA256}", "a/b", "referrers", "/v2/{name}/referrers/{digest}"),
        (
            f"referrers/manifests/{SHA256}",
            "referrers",
            "manifests",
            "/v2/{name}/manifests/{reference}",
        ),
        # A repository may itself be called "manifests" or "blobs".
        ("manifests/manifests/v1", "manifests", "manifests", "/v2/{name}/manifests/{reference}"),
    ],
)
def test_parse_path(rest: str, name: str, kind: str, route: str) -> None:
    path = parse_path(rest)
    assert (path.name, path.kind, path.route) == (name, kind, route)


@pytest.mark.parametrize(
    ("rest", "code"),
    [
        pytest.param("a/blobs/latest", "DIGEST_INVALID", id="blob-by-tag"),
        pytest.param("a/referrers/latest", "DIGEST_INVALID", id="referrers-of-a-tag"),
        pytest.param("a/blobs/uploads/", "NAME_UNKNOWN", id="upload-endpoint"),
        pytest.param("a/other/x", "NAME_UNKNOWN", id="unknown-endpoint"),
        pytest.param("../../x/manifests/latest", "NAME_INVALID", id="traversal"),
        pytest.param("a" * 600 + "/manifests/x", "NAME_INVALID", id="absurd-length"),
    ],
)
def test_parse_path_errors(rest: str, code: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_path(rest)
    assert err.value.code == code
