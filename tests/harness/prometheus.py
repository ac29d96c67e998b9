"""A real Prometheus (Debian `prometheus`), private to a test, scraping on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .daemon import Daemon, expect_status, find_binary, free_port


class Prometheus(Daemon):
    """Scrapes `targets` every `interval_ms`; loads `rule_files` (alerts)."""

    name = "prometheus"
    start_timeout = 30.0
    stop_grace = 15.0

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        interval_ms: int = 1000,
        rule_files: list[Path] | None = None,
    ) -> None:
        super().__init__(workdir, "prometheus.log")
        self.targets = targets
        self.interval = f"{interval_ms}ms"
        self.rule_files = rule_files or []
        self.port = free_port()
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            find_binary("prometheus", "prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]

    def prepare(self) -> None:
        config = {
            "global": {
                "scrape_interval": self.interval,
                "evaluation_interval": self.interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": "mirror", "static_configs": [{"targets": self.targets}]}
            ],
        }
        self.config_path.write_text(json.dumps(config))  # JSON is YAML

    def check_ready(self) -> None:
        expect_status(self.url + "/-/ready", 200)

    def query(self, expr: str) -> dict[str, Any]:
        """The `data` of an instant query; raises with Prometheus' error if it failed."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            with err:
                body = json.load(err)
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        data: dict[str, Any] = body["data"]
        return data
