from __future__ import annotations

import json

import pytest

from mirror.errors import CODES, RegistryError

SPEC_CODES = [
    "BLOB_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_INVALID",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
]


@pytest.mark.parametrize("code", SPEC_CODES)
def test_every_spec_code_renders_the_envelope(code: str) -> None:
    err = RegistryError(code, detail={"x": 1})
    body = json.loads(err.body())
    assert body == {"errors": [{"code": code, "message": CODES[code].message, "detail": {"x": 1}}]}
    assert 400 <= err.status < 600


def test_status_and_headers_can_be_overridden() -> None:
    err = RegistryError(
        "UNAVAILABLE", "upstream timed out", status=504, headers={"Retry-After": "3"}
    )
    assert err.status == 504
    assert err.headers == {"Retry-After": "3"}
    assert "detail" not in json.loads(err.body())["errors"][0]


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        RegistryError("NOT_A_CODE")
