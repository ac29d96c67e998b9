"""End to end: the status page in a real headless chromium, on the admin listener of the
real `mirror serve`, in front of the real Distribution registry reached through a slow
link (ThrottledRelay), so that a cold pull lasts long enough to watch.

The page is loaded during a cold pull of an image with one 24 MiB layer: its download
shows, and its progress moves. The image is then found with the search box and purged
with its button, and the mirror really no longer has it. A screenshot of the page during
the pull is saved next to the test's files; with UPDATE_SCREENSHOTS=1 it also replaces
docs/status-page.png (the README's picture).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from fakes.quota import Quota
from harness import Layout, free_port, push, require_module
from harness.hubfront import HubFront
from harness.images import seeded_bytes
from harness.mirror import MirrorProcess, skopeo_copy
from harness.throttle import ThrottledRelay

require_module("selenium")  # before the imports that need it: a skip, or in CI a failure

from harness.browser import Browser, wait_for  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SCREENSHOT = Path(__file__).parents[2] / "docs" / "status-page.png"
# A platform name from an upstream registry that would be markup if the page parsed it.
HOSTILE = "<img src=x onerror=document.title=1>"


@dataclass
class BigImage:
    repo: str
    tag: str
    layer: str  # the digest of its 24 MiB layer
    size: int


@pytest.fixture(scope="module")
def big_image(real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    """One 24 MiB layer of incompressible bytes: ~8 s through a 3 MB/s link."""
    layout = Layout(tmp_path_factory.mktemp("ui-big") / "layout")
    image = layout.image([[("big.bin", seeded_bytes("ui-big", 24 * MiB))]])
    layout.tag(image, "big")
    push(layout.root, "big", real_upstream.registry, "ui/big", "1")
    layers = json.loads(layout.read(image["digest"]))["layers"]
    largest = max(layers, key=lambda d: d["size"])
    return BigImage("ui/big", "1", largest["digest"], largest["size"])


class AdminMirror(MirrorProcess):
    """`mirror serve` with its admin listener (the page and the admin API) on a port of
    its own."""

    def __init__(self, workdir: Path, upstream: str) -> None:
        self.admin_port = free_port()
        super().__init__(
            workdir, upstream, env={"MIRROR_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}"}
        )

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def pull(mirror: MirrorProcess, repo: str, tag: str, dest: Path) -> None:
    result = skopeo_copy(f"docker://{mirror.host}/{repo}:{tag}", f"dir:{dest}", multi_arch=True)
    assert result.returncode == 0, result.stderr


def rows(browser: Browser, css: str) -> list[WebElement]:
    return browser.driver.find_elements(By.CSS_SELECTOR, css)


def image_row(browser: Browser, repo: str, tag: str) -> WebElement | None:
    found = rows(browser, f'#images tr[data-repository="{repo}"][data-reference="{tag}"]')
    return found[0] if found else None


def search(browser: Browser, text: str) -> None:
    box = browser.driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys(text)


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def head_blob(mirror: MirrorProcess, repo: str, digest: str) -> str:
    r = httpx.head(f"{mirror.url}/v2/{repo}/blobs/{digest}", timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-cache"]


def test_the_page_shows_a_cold_pull_and_purges_the_image(
    real_upstream: RealUpstream, big_image: BigImage, tmp_path: Path
) -> None:
    host, port = real_upstream.registry.host.split(":")
    small = real_upstream.images["schema2"]
    multi = real_upstream.images["index"]
    with (
        ThrottledRelay(host, int(port), 3e6) as relay,
        AdminMirror(tmp_path / "mirror", relay.url) as mirror,
        Browser(tmp_path / "browser") as browser,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        # Something cached already, so the page has rows to show, and hits (the second
        # pull of `small`) to count.
        for image in (small, multi, small):
            pull(mirror, image.repo, image.tag, tmp_path / image.repo.replace("/", "-"))

        # The page is the admin listener's root.
        page = httpx.get(f"{mirror.admin_url}/ui", timeout=10)
        assert not re.search(r"https?://", page.text)  # nothing to fetch from elsewhere
        cold = pool.submit(pull, mirror, big_image.repo, big_image.tag, tmp_path / "big")
        driver = browser.driver
        driver.get(f"{mirror.admin_url}/")
        assert driver.current_url == f"{mirror.admin_url}/ui"

        # The download in flight, with its progress moving.
        css = f'#downloads tr[data-digest="{big_image.layer}"]'
        size = f"of {big_image.size / 1e6:.1f} MB"  # the layer's, once the upstream said it

        def shown() -> tuple[int, str] | None:
            found = rows(browser, css)
            text = found[0].find_element(By.CLASS_NAME, "dl-progress").text if found else ""
            return (int(found[0].get_attribute("data-bytes") or 0), text) if size in text else None

        first_bytes, first_text = wait_for(shown, "the download to show", 30)

        def moved() -> tuple[int, str] | None:
            (now,) = rows(browser, css)
            shown = int(now.get_attribute("data-bytes") or 0)
            text = now.find_element(By.CLASS_NAME, "dl-progress").text
            return (shown, text) if shown > first_bytes and text != first_text else None

        later_bytes, later_text = wait_for(moved, "the download's progress to move", 15)
        assert not cold.done(), "the pull ended before the page saw it move: slow it down"
        assert later_bytes < big_image.size
        percents = [int(m) for m in re.findall(r"\((\d+)%\)", first_text + later_text)]
        assert len(percents) == 2 and percents[0] <= percents[1] < 100, (first_text, later_text)
        # The other sections, as a person sees them.
        upstream_row = rows(browser, "#upstreams tr[data-upstream]")[0]
        assert "healthy" in upstream_row.text
        hit_ratio = driver.find_element(By.ID, "hit-ratio").text
        assert re.fullmatch(r"[\d.]+%", hit_ratio) and hit_ratio != "0.0%", hit_ratio
        platforms = {
            r.get_attribute("data-repository"): r.find_element(By.CLASS_NAME, "platforms").text
            for r in rows(browser, "#images tr[data-repository]")
        }
        assert platforms[small.repo] == "linux/amd64"
        assert platforms[multi.repo] == "linux/amd64, linux/arm64"
        png = browser.screenshot(tmp_path / "status-page.png")
        assert png_size(png) == (1280, 900)
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            SCREENSHOT.write_bytes(png)

        cold.result(timeout=60)
        wait_for(lambda: not rows(browser, "#downloads tr[data-digest]"), "the download to end")
        assert head_blob(mirror, big_image.repo, big_image.layer) == "HIT"

        # Search, then purge from the page.
        search(browser, "ui/big")

        def only_it() -> WebElement | None:
            listed = [r.get_attribute("data-repository") for r in rows(browser, "#images tr")]
            return (
                image_row(browser, big_image.repo, big_image.tag)
                if listed == [big_image.repo]
                else None
            )

        found = wait_for(only_it, "the search to find it, and only it")
        assert found.find_element(By.CLASS_NAME, "reference").text == big_image.tag
        upstream = found.get_attribute("data-upstream")
        found.find_element(By.CSS_SELECTOR, 'button[data-action="purge"]').click()
        dialog = browser.alert()
        assert dialog.text == f"Purge {upstream}/{big_image.repo}:{big_image.tag} from the cache?"
        dialog.accept()
        message = wait_for(
            lambda: driver.find_element(By.ID, "message").text or None, "the purge's message"
        )
        freed = re.fullmatch(
            rf"purged {re.escape(f'{upstream}/{big_image.repo}:{big_image.tag}')}: "
            r"(\d+) blobs?, ([\d.]+) MB freed",
            message,
        )
        assert freed is not None, message
        assert int(freed[1]) >= 2  # the layer and the config
        assert float(freed[2]) >= round(big_image.size / 1e6, 1)
        wait_for(
            lambda: image_row(browser, big_image.repo, big_image.tag) is None,
            "the row to disappear",
        )
        assert driver.find_element(By.ID, "images").text == "nothing cached matches"

        # The mirror really dropped it, not only the page.
        listed = httpx.get(f"{mirror.admin_url}/admin/v1/images", params={"q": "ui/big"}).json()
        assert listed == {"images": []}
        assert head_blob(mirror, big_image.repo, big_image.layer) == "MISS"

        # Pin and unpin another image from the page.
        search(browser, small.repo)

        def pinned_state(want: str) -> WebElement | None:
            row = image_row(browser, small.repo, small.tag)
            return row if row and row.find_element(By.CLASS_NAME, "pinned").text == want else None

        wait_for(lambda: pinned_state(""), "the unpinned image").find_element(
            By.CSS_SELECTOR, 'button[data-action="pin"]'
        ).click()
        wait_for(lambda: pinned_state("pinned"), "the image to show pinned").find_element(
            By.CSS_SELECTOR, 'button[data-action="unpin"]'
        ).click()
        wait_for(lambda: pinned_state(""), "the image to show unpinned")
        assert driver.find_element(By.ID, "message").text == (
            f"unpinned {upstream}/{small.repo}:{small.tag}"
        )

        # Everything the page loaded came from the mirror itself, and it ran cleanly (a
        # CSP violation would be a console error).
        loaded = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert loaded and all(url.startswith(mirror.admin_url + "/") for url in loaded), loaded
        errors = [e for e in browser.console() if e["level"] == "SEVERE"]
        assert errors == []


def test_names_from_upstream_are_shown_as_text(real_upstream: RealUpstream, tmp_path: Path) -> None:
    """Repository names and tags cannot hold markup, but platforms (an index's, an image
    config's) are free text from the upstream: the page shows them, and runs nothing."""
    layout = Layout(tmp_path / "layout")
    child = layout.image([[("etc/hostile", b"x\n")]], arch=HOSTILE)
    layout.tag(layout.index({f"linux/{HOSTILE}": child}), "hostile")
    push(layout.root, "hostile", real_upstream.registry, "ui/hostile", "1", multi_arch=True)
    with (
        AdminMirror(tmp_path / "mirror", real_upstream.registry.url) as mirror,
        Browser(tmp_path / "browser") as browser,
    ):
        pull(mirror, "ui/hostile", "1", tmp_path / "pulled")
        browser.driver.get(f"{mirror.admin_url}/ui")
        search(browser, "hostile")
        row = wait_for(lambda: image_row(browser, "ui/hostile", "1"), "the image to show")
        assert row.find_element(By.CLASS_NAME, "platforms").text == f"linux/{HOSTILE}"
        assert rows(browser, "#images img") == []
        assert browser.driver.title == "mirror status"


def test_an_image_listed_during_its_pull_gets_its_platform(
    real_upstream: RealUpstream, big_image: BigImage, tmp_path: Path
) -> None:
    """What the page does every few seconds: list the images while one is pulled."""
    host, port = real_upstream.registry.host.split(":")
    with (
        ThrottledRelay(host, int(port), 3e6) as relay,
        AdminMirror(tmp_path / "mirror", relay.url) as mirror,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        images = f"{mirror.admin_url}/admin/v1/images"
        cold = pool.submit(pull, mirror, big_image.repo, big_image.tag, tmp_path / "big")

        def listed_mid_pull() -> bool:
            return bool(httpx.get(images, params={"q": big_image.repo}).json()["images"])

        wait_for(listed_mid_pull, "the image to be listed during its pull", 30)
        assert not cold.done()
        cold.result(timeout=60)
        (image,) = httpx.get(images, params={"q": big_image.repo}).json()["images"]
        assert image["platforms"] == ["linux/amd64"]


def test_a_spent_pull_limit_shows_on_the_page(real_upstream: RealUpstream, tmp_path: Path) -> None:
    """Before Docker Hub's quota (a Hub-like front), one pull spends the last pull: the
    page says misses now get 429, in the upstream's row."""
    image = real_upstream.images["schema2"]
    quota = Quota(limit=10, remaining=1, retry_after="600")
    with (
        HubFront(real_upstream.registry.url, quota) as front,
        AdminMirror(tmp_path / "mirror", front.url) as mirror,
        Browser(tmp_path / "browser") as browser,
    ):
        pull(mirror, image.repo, image.tag, tmp_path / "pulled")
        assert quota.remaining == 0
        browser.driver.get(f"{mirror.admin_url}/ui")
        cell = wait_for(
            lambda: next(iter(rows(browser, "#upstreams td[data-budget=exhausted]")), None),
            "the spent budget to show",
        )
        assert cell.text == "0 / 10 (spent: misses get 429)"
        assert "bad" in (cell.get_attribute("class") or "").split()
        # What the page says is what a client gets: a miss is refused, upstream unasked.
        asked = len(front.seen)
        r = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/other", timeout=30)
        assert (r.status_code, r.json()["errors"][0]["code"]) == (429, "TOOMANYREQUESTS")
        assert len(front.seen) == asked
