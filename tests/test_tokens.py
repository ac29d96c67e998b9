from __future__ import annotations

import pytest
from fakes.clock import Clock

from mirror.tokens import DEFAULT_EXPIRES_IN, TokenCache

KEY = ("https://auth/token", "svc", "repository:a:pull")


def test_token_cached_until_shortly_before_expiry() -> None:
    clock = Clock()
    cache = TokenCache(clock)
    cache.put(KEY, "t1", 300)
    clock.now += 280
    assert cache.get(KEY) == "t1"
    clock.now += 15  # within the refresh margin of expiry
    assert cache.get(KEY) is None


@pytest.mark.parametrize("expires_in", [None, "junk", 0, -5])
def test_missing_or_bad_expires_in_means_60_seconds(expires_in: object) -> None:
    clock = Clock()
    cache = TokenCache(clock)
    cache.put(KEY, "t", expires_in)
    clock.now += DEFAULT_EXPIRES_IN - 11
    assert cache.get(KEY) == "t"
    clock.now += 2
    assert cache.get(KEY) is None


def test_short_lived_token_refreshed_at_half_life() -> None:
    clock = Clock()
    cache = TokenCache(clock)
    cache.put(KEY, "t", 10)
    clock.now += 4
    assert cache.get(KEY) == "t"
    clock.now += 2
    assert cache.get(KEY) is None


def test_idle_locks_and_expired_tokens_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    import mirror.tokens

    monkeypatch.setattr(mirror.tokens, "MAX_IDLE_ENTRIES", 10)
    clock = Clock()
    cache = TokenCache(clock)
    for i in range(100):
        cache.lock(("realm", "svc", f"repository:r{i}:pull"))
        cache.put(("realm", "svc", f"repository:r{i}:pull"), "t", 1)
        clock.now += 5
    assert len(cache._locks) <= 10
    assert len(cache._tokens) <= 20  # pruned along with the locks


@pytest.mark.parametrize("expires_in", ["1" + "0" * 400, float("inf"), float("nan"), 10**12])
def test_a_hostile_expires_in_neither_crashes_nor_pins_a_token(expires_in: object) -> None:
    from mirror.tokens import MAX_LIFETIME, token_lifetime

    assert 0 < token_lifetime(expires_in) <= MAX_LIFETIME
