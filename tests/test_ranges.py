from __future__ import annotations

import pytest

from mirror.errors import RegistryError
from mirror.ranges import ByteRange, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        pytest.param("bytes=0-99", 1000, ByteRange(0, 100), id="first-last"),
        pytest.param("bytes=500-", 1000, ByteRange(500, 1000), id="open-ended"),
        pytest.param("bytes=900-5000", 1000, ByteRange(900, 1000), id="clamped"),
        pytest.param("bytes=-100", 1000, ByteRange(900, 1000), id="suffix"),
        pytest.param("bytes=-5000", 1000, ByteRange(0, 1000), id="suffix-larger-than-size"),
        pytest.param("bytes=999-999", 1000, ByteRange(999, 1000), id="last-byte"),
    ],
)
def test_satisfiable(header: str, size: int, expected: ByteRange) -> None:
    spec = parse_range(header)
    assert spec is not None
    rng = spec.resolve(size)
    assert rng == expected
    assert rng.content_range(size) == f"bytes {expected.start}-{expected.end - 1}/{size}"


@pytest.mark.parametrize(
    ("header", "size"),
    [
        pytest.param("bytes=1000-", 1000, id="start-at-size"),
        pytest.param("bytes=-0", 1000, id="empty-suffix"),
        pytest.param("bytes=0-", 0, id="empty-blob"),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    spec = parse_range(header)
    assert spec is not None
    with pytest.raises(RegistryError) as err:
        spec.resolve(size)
    assert err.value.status == 416
    assert err.value.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize(
    "header",
    ["bytes=5-1", "bytes=a-b", "items=0-1", "bytes=0-1,5-6", "bytes=-", "bytes="],
)
def test_malformed(header: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_range(header)
    assert err.value.code == "RANGE_INVALID"
    assert err.value.status == 416


def test_absent() -> None:
    assert parse_range(None) is None
