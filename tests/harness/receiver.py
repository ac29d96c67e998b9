"""A real webhook receiver process for the events e2e tests (tests/harness/webhookd.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .daemon import Daemon, expect_status, free_port


class WebhookReceiver(Daemon):
    """Records every POST to `deliveries.jsonl`; stopped and restarted on one port."""

    name = "webhook receiver"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "receiver.log")
        self.port = free_port()
        self.record = self.workdir / "deliveries.jsonl"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        script = Path(__file__).with_name("webhookd.py")
        return [sys.executable, str(script), str(self.port), str(self.record)]

    def check_ready(self) -> None:
        expect_status(self.url + "/ready", 200)

    def deliveries(self) -> list[dict[str, Any]]:
        """Every POST received so far (path, headers, body), in order."""
        if not self.record.exists():
            return []
        lines = self.record.read_text(encoding="utf-8").splitlines()
        # The last line may be half written while the receiver runs.
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                break
        return found

    def events(self, path: str) -> list[dict[str, Any]]:
        """The events POSTed to `path`, in the order received."""
        return [e for d in self.deliveries() if d["path"] == path for e in d["body"]["events"]]
