"""Stale-while-revalidate and Docker Hub's pull budget, end to end: the real `mirror
serve` before a Hub-like front (`harness.hubfront`: the real registry plus Hub's
`ratelimit-*` headers and 429s), with skopeo and plain HTTP as clients."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from fakes.quota import Quota
from harness import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Layout,
    fetch_token,
    push,
    registry_get,
)
from harness.daemon import wait_for
from harness.hubfront import HubFront
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

ACCEPT = {"Accept": ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))}
TTL_PASSED = 1.1  # past a tag TTL of 1 s (a real process has no injectable clock)


def push_tiny(real_upstream: RealUpstream, layout: Layout, name: str, repo: str, tag: str) -> str:
    """Push a one-file image of its own content to repo:tag; its manifest digest."""
    layout.tag(layout.image([[(f"etc/{name}", f"{name}\n".encode())]]), name)
    return push(layout.root, name, real_upstream.registry, repo, tag)


def pulled_digest(layout: Path) -> str:
    """The manifest digest skopeo wrote into an OCI layout."""
    digest: str = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return digest


def manifest_path(repo: str, ref: str) -> str:
    return f"/v2/{repo}/manifests/{ref}"


def test_a_tag_past_its_ttl_is_answered_at_once_and_revalidated_in_the_background(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "layout")
    repo, tag = "e2e/swr", "live"
    path = manifest_path(repo, tag)
    old = push_tiny(real_upstream, layout, "old", repo, tag)
    env = {"MIRROR_TAG_TTL": "1s", "MIRROR_STALE_WHILE_REVALIDATE": "1h"}
    with (
        HubFront(real_upstream.registry.url, Quota(limit=100, remaining=100)) as front,
        MirrorProcess(tmp_path / "m", front.url, env=env) as mirror,
        httpx.Client(base_url=mirror.url, headers=ACCEPT, timeout=30) as client,
    ):

        def revalidations(result: str) -> float:
            return mirror.metric(
                "mirror_background_revalidations_total", upstream=front.host, result=result
            )

        first = client.get(path)
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        assert first.headers["docker-content-digest"] == old
        heads, gets = front.count("HEAD", path), front.count("GET", path)

        time.sleep(TTL_PASSED)
        updating = client.get(path)
        assert (updating.status_code, updating.headers["x-cache"]) == (200, "UPDATING")
        assert updating.headers["docker-content-digest"] == old
        assert updating.content == first.content
        wait_for(lambda: revalidations("unchanged") == 1, "the background revalidation")
        # One HEAD asked whether the tag moved; no GET, so no pull spent.
        assert (front.count("HEAD", path), front.count("GET", path)) == (heads + 1, gets)
        assert mirror.metric("mirror_cache_requests_total", kind="manifest", result="updating") == 1
        fresh = client.get(path)  # the revalidation made the tag fresh again
        assert (fresh.headers["x-cache"], fresh.content) == ("HIT", first.content)

        new = push_tiny(real_upstream, layout, "new", repo, tag)
        time.sleep(TTL_PASSED)
        heads, gets = front.count("HEAD", path), front.count("GET", path)
        moving = client.get(path)
        # Answered at once from the cache: the old digest this one time...
        assert (moving.status_code, moving.headers["x-cache"]) == (200, "UPDATING")
        assert (moving.headers["docker-content-digest"], moving.content) == (old, first.content)
        wait_for(lambda: revalidations("moved") == 1, "the background fetch of the moved tag")
        assert (front.count("HEAD", path), front.count("GET", path)) == (heads + 1, gets + 1)
        # ...and the new one from then on, without asking the upstream again.
        moved = client.get(path)
        assert (moved.status_code, moved.headers["x-cache"]) == (200, "HIT")
        assert moved.headers["docker-content-digest"] == new
        assert revalidations("failed") == 0
        # Two pulls in all: the first miss and the moved tag; never an unchanged tag.
        assert front.quota.gets == 2

        # A real client pulls the tag's new content (its Accept list is a tag entry of
        # its own in the cache, so this is a miss of its own).
        pulled = skopeo_copy(f"docker://{mirror.host}/{repo}:{tag}", f"oci:{tmp_path / 'out'}:x")
        assert pulled.returncode == 0, pulled.stderr
        assert pulled_digest(tmp_path / "out") == new


def test_under_the_reserve_tags_are_served_stale_and_a_spent_budget_is_not_hammered(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "layout")
    repo = "e2e/budget"
    tags = ("cached", "m1", "m2", "m3", "m4")
    digests = {tag: push_tiny(real_upstream, layout, tag, repo, tag) for tag in tags}
    paths = {tag: manifest_path(repo, tag) for tag in tags}
    # The reserve is half of 6, so 3: with 4 pulls left, the second puts the mirror under it.
    quota = Quota(limit=6, remaining=4, retry_after="2")
    env = {"MIRROR_TAG_TTL": "1s", "MIRROR_RATELIMIT_RESERVE": "50%"}
    with (
        HubFront(real_upstream.registry.url, quota) as front,
        MirrorProcess(tmp_path / "m", front.url, env=env) as mirror,
        httpx.Client(base_url=mirror.url, headers=ACCEPT, timeout=30) as client,
    ):

        def mode() -> float:
            return mirror.metric("mirror_upstream_budget_mode", upstream=front.host)

        def changes(to: str) -> float:
            return mirror.metric(
                "mirror_upstream_budget_changes_total", upstream=front.host, mode=to
            )

        def saved(action: str) -> float:
            return mirror.metric(
                "mirror_upstream_budget_saved_total", upstream=front.host, action=action
            )

        first = client.get(paths["cached"])
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        assert (quota.remaining, mode()) == (3, 0)
        pulled = skopeo_copy(f"docker://{mirror.host}/{repo}:m1", f"oci:{tmp_path / 'm1'}:x")
        assert pulled.returncode == 0, pulled.stderr
        assert pulled_digest(tmp_path / "m1") == digests["m1"]
        assert (quota.gets, quota.remaining) == (2, 2)
        assert (mode(), changes("reserve")) == (1, 1)

        # The tag moves upstream; under the reserve the mirror asks (HEAD, free) but
        # spends no pull on it, and serves what it has.
        push_tiny(real_upstream, layout, "cached-moved", repo, "cached")
        time.sleep(TTL_PASSED)
        heads, gets = front.count("HEAD", paths["cached"]), front.count("GET", paths["cached"])
        stale = client.get(paths["cached"])
        assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
        assert (stale.headers["docker-content-digest"], stale.content) == (
            digests["cached"],
            first.content,
        )
        assert front.count("HEAD", paths["cached"]) == heads + 1
        assert front.count("GET", paths["cached"]) == gets
        assert saved("deferred") == 1

        # Content the mirror does not have is still fetched while pulls remain.
        m2 = client.get(paths["m2"])
        assert (m2.status_code, m2.headers["x-cache"]) == (200, "MISS")
        assert m2.headers["docker-content-digest"] == digests["m2"]
        assert quota.remaining == 1

        # Another host behind the same address spends the last pull (Hub counts per
        # address), so the mirror meets Hub's own 429 on its next miss.
        token = fetch_token(real_upstream.tokens, repo)
        assert registry_get(front.url, paths["m1"], token)[0] == 200
        m3 = client.get(paths["m3"])
        assert m3.status_code == 429, m3.text
        assert m3.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert 1 <= int(m3.headers["retry-after"]) <= 2
        assert front.count("GET", paths["m3"], 429) == 1

        # Until Retry-After has passed, misses are refused by the mirror itself.
        m4 = client.get(paths["m4"])
        assert m4.status_code == 429, m4.text
        assert m4.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert 1 <= int(m4.headers["retry-after"]) <= 2
        assert [s for s in front.seen if s.path == paths["m4"]] == []
        assert (mode(), changes("exhausted"), saved("refused")) == (2, 1, 1)
        # What it has, it still serves.
        by_digest = client.get(manifest_path(repo, digests["cached"]))
        assert (by_digest.status_code, by_digest.headers["x-cache"]) == (200, "HIT")

        # A real client gets one clear line, not a trace.
        refused = skopeo_copy(f"docker://{mirror.host}/{repo}:m4", f"oci:{tmp_path / 'm4'}:x")
        assert refused.returncode != 0
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "toomanyrequests" in lines[0].lower()

        # The window has passed upstream: once the mirror's Retry-After is over, the
        # first miss goes upstream again, and only that one.
        quota.reset()
        seen_before = front.count("GET", paths["m4"])
        answers: list[int] = []

        def m4_served() -> bool:
            answers.append(client.get(paths["m4"]).status_code)
            return answers[-1] == 200

        wait_for(m4_served, "a miss served after Retry-After", timeout=10)
        assert set(answers[:-1]) <= {429}
        assert front.count("GET", paths["m4"]) == seen_before + 1
        assert mode() == 0
        # skopeo's own retries (it honours Retry-After) may have met Hub's 429 again.
        assert changes("normal") >= 1 and changes("exhausted") >= 1
        assert changes("reserve") == 1
        # The operator is told when each mode starts and ends.
        log = mirror.log()
        assert f"upstream {front.host}: 2 of 6 pulls left, under the reserve of 3" in log
        assert f"upstream {front.host}: pull rate limit reached" in log
        assert f"upstream {front.host}: rate-limit budget back to normal" in log
