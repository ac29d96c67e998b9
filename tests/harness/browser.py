"""A real browser for the status page: Debian's headless chromium, driven by selenium
through Debian's chromedriver (built from the same source, so the two always match).

Both paths are given to selenium, which then never runs its Selenium Manager (that
would look for, and download, a driver over the network). The browser gets a profile
directory of its own, under the test's workdir, and is stopped, with its driver, when
the `with` block ends. Its console (errors, and CSP violations above all) is kept, so
a test can assert the page ran cleanly.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.alert import Alert

from . import require_tool

T = TypeVar("T")


class Browser:
    """`with Browser(workdir) as browser:` headless chromium at `size` (width, height)."""

    def __init__(self, workdir: Path, size: tuple[int, int] = (1280, 900)) -> None:
        self.workdir = Path(workdir)
        self.size = size
        self._driver: webdriver.Chrome | None = None
        self._service: Service | None = None

    @property
    def driver(self) -> webdriver.Chrome:
        assert self._driver is not None, "the browser is not running"
        return self._driver

    def __enter__(self) -> Self:
        chromium = require_tool("chromium")
        chromedriver = require_tool("chromedriver")
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in (
            "--headless=new",
            # Tests run as root, where chromium's sandbox cannot start.
            "--no-sandbox",
            # Containers often have a tiny /dev/shm; chromium then crashes on big pages.
            "--disable-dev-shm-usage",
            f"--window-size={self.size[0]},{self.size[1]}",
            f"--user-data-dir={profile}",
            # Nothing but the page under test talks to the network.
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self._service = Service(chromedriver, log_output=str(self.workdir / "chromedriver.log"))
        self._driver = webdriver.Chrome(options=options, service=self._service)
        self._driver.set_page_load_timeout(30)
        # --window-size counts the window's frame: the page itself (and a screenshot)
        # gets exactly `size` only this way.
        width, height = self.size
        self._driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._driver is not None:
            with contextlib.suppress(Exception):
                self._driver.quit()  # closes chromium, then stops the driver
            self._driver = None
        # Should quit() have failed half-way, stop the driver by its own pid; chromium
        # is its child and goes with it.
        process: subprocess.Popen[bytes] | None = getattr(self._service, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def console(self) -> list[dict[str, Any]]:
        """Console entries since the last call: {"level", "message", ...}."""
        # selenium leaves get_log untyped.
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return entries

    def alert(self, timeout: float = 10) -> Alert:
        """The open alert/confirm dialog, once there is one."""

        def dialog() -> Alert | None:
            try:
                alert = self.driver.switch_to.alert
                _ = alert.text  # raises while there is none
                return alert
            except NoAlertPresentException:
                return None

        return wait_for(dialog, "a dialog to open", timeout)

    def screenshot(self, path: Path) -> bytes:
        png: bytes = self.driver.get_screenshot_as_png()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 20) -> T:
    """Poll `check` until it returns something other than None (or False); the page
    re-renders, so an element found a moment ago may be gone: that is a retry too."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except StaleElementReferenceException as err:
            last, value = err, None
        if value is not None and value is not False:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}") from last
