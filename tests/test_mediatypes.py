from __future__ import annotations

import random

import pytest

from mirror.mediatypes import (
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    OCI_INDEX,
    OCI_MANIFEST,
    AcceptSet,
)

DOCKER_LINES = [
    DOCKER_MANIFEST_V2,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]


def test_six_lines_in_any_order_share_one_key() -> None:
    keys = set()
    for seed in range(10):
        lines = DOCKER_LINES[:]
        random.Random(seed).shuffle(lines)
        accept = AcceptSet.from_headers(lines)
        assert set(accept.types) == set(DOCKER_LINES)
        assert accept.accepts(OCI_INDEX)
        keys.add(accept.cache_key)
    assert len(keys) == 1


def test_containerd_comma_joined_with_wildcard() -> None:
    accept = AcceptSet.from_headers([f"{OCI_INDEX}, {DOCKER_MANIFEST_LIST}, */*"])
    assert accept.wildcard
    assert accept.accepts("application/anything")
    assert accept.header() == f"{OCI_INDEX}, {DOCKER_MANIFEST_LIST}, */*"
    assert accept.cache_key != AcceptSet.from_headers(["*/*"]).cache_key


def test_schema2_only_client_never_accepts_an_index() -> None:
    accept = AcceptSet.from_headers([DOCKER_MANIFEST_V2])
    assert not accept.accepts(DOCKER_MANIFEST_LIST)
    assert not accept.accepts(OCI_INDEX)
    assert accept.accepts(DOCKER_MANIFEST_V2)
    assert accept.cache_key != AcceptSet.from_headers(DOCKER_LINES).cache_key


@pytest.mark.parametrize(
    ("lines", "accepts_index"),
    [
        pytest.param([f"{OCI_INDEX};q=0", OCI_MANIFEST], False, id="q-zero-excluded"),
        pytest.param([f"{OCI_INDEX}; q=0.5"], True, id="params-stripped"),
        pytest.param(["APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON"], True, id="case-insensitive"),
        pytest.param([], True, id="no-accept-means-anything"),
        pytest.param(["", " , "], True, id="empty-lines"),
    ],
)
def test_accept_parsing(lines: list[str], accepts_index: bool) -> None:
    assert AcceptSet.from_headers(lines).accepts(OCI_INDEX) is accepts_index


def test_unrelated_types_do_not_split_the_cache() -> None:
    a = AcceptSet.from_headers([DOCKER_MANIFEST_V2, "text/html"])
    b = AcceptSet.from_headers([DOCKER_MANIFEST_V2])
    assert a.cache_key == b.cache_key
