from __future__ import annotations

import pytest

from mirror.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5TiB", int(1.5 * 2**40)),
        (1024, 1024),
        ("none", None),
        ("0", None),
        ("2048", 2048),
    ],
)
async def test_sizes(text: object, size: int | None) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300), (45, 45), ("5m", 300), ("1.5h", 5400), ("7d", 604800), ("250ms", 0.25)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_values_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 50GiB"):
        parse_size("lots")
    with pytest.raises(ValueError, match=r"e\.g\. 5m"):
        parse_duration("soon")
