"""A real Prometheus scrapes the real mirror process; every query we ship must return data.

The Grafana dashboard's expressions and the alert rules' signals are run against it
after real pulls (skopeo, through the mirror, from the real registry). A panel or an
alert that names a metric or label the mirror does not export returns nothing, and
fails here.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import RealUpstream
from fakes.pki import CA
from harness import free_port, require_root, require_tool
from harness.mirror import MirrorProcess, TLSMirror, skopeo_copy
from harness.prometheus import Prometheus
from harness.redisserver import RedisServer
from harness.rgw import RadosGateway

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "mirror.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# What Grafana substitutes before sending a query; `.*` is what "All" sends.
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
    "$instance": ".*",
    "$upstream": ".*",
}
_THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[-+0-9.e]+\s*$")


# Its panels need a mirror with store s3 (the series exist only there).
SHARED_ROW = "Shared store"


def dashboard_queries(*, shared: bool = False) -> list[tuple[str, str]]:
    """(panel title, expression with variables substituted) for every panel target,
    of the shared store's row (`shared`) or of every other row."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        if (row == SHARED_ROW) != shared:
            continue
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def _split_top_level(expr: str, word: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and expr.startswith(f" {word} ", i):
            parts.append(expr[start:i])
            start = i + len(word) + 2
    parts.append(expr[start:])
    return parts


# Their series exist only with TLS on the listener.
TLS_ALERTS = {"MirrorTLSCertificateExpiringSoon", "MirrorTLSReloadFailing"}


def alert_signals(*, tls: bool = False) -> list[tuple[str, str]]:
    """(alert, signal) with each term's threshold removed: `A > 0.2 and B > 1` -> A, B.

    An alert normally returns nothing (nothing is wrong); its signal must return data.
    `tls`: the TLS alerts' signals only; else every other one.
    """
    rules = yaml.safe_load(ALERTS.read_text())
    signals = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if (rule["alert"] in TLS_ALERTS) != tls:
                continue
            for term in _split_top_level(" ".join(rule["expr"].split()), "and"):
                signal, count = _THRESHOLD.subn("", term)
                assert count == 1, f"{rule['alert']}: no threshold in {term!r}"
                signals.append((rule["alert"], signal))
    return signals


def test_query_extraction_sees_every_panel_and_alert() -> None:
    panels = {title for title, _ in dashboard_queries()}
    assert len(panels) == 20
    shared = {title for title, _ in dashboard_queries(shared=True)}
    assert len(shared) == 7
    assert len({alert for alert, _ in alert_signals()}) == 10
    assert {alert for alert, _ in alert_signals(tls=True)} == TLS_ALERTS


def test_every_dashboard_and_alert_query_returns_data(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    require_tool("prometheus")
    image = real_upstream.images["oci"]
    with (
        MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror,
        Prometheus(tmp_path / "prom", [mirror.host], rule_files=[ALERTS]) as prom,
    ):

        def pull(round_: str) -> None:
            result = skopeo_copy(
                f"docker://{mirror.host}/{image.repo}:{image.tag}", f"oci:{tmp_path / round_}:x"
            )
            assert result.returncode == 0, result.stderr

        def wait_for(expr: str) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = prom.query(expr)["result"]
                if found and float(found[0]["value"][1]) > 0:
                    return
                time.sleep(0.25)
            pytest.fail(f"Prometheus never saw {expr}")

        pull("cold")
        wait_for('sum(mirror_cache_requests_total{result="miss"})')
        # rate() needs the counters to move between two scrapes: the warm pull
        # happens while Prometheus watches.
        pull("warm")
        wait_for('sum(mirror_cache_requests_total{result="hit"})')
        time.sleep(3)
        empty = []
        for where, expr in dashboard_queries() + alert_signals():
            if not prom.query(expr)["result"]:
                empty.append(f"{where}: {expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)

        # What the panels show is what happened: the warm pull was served from cache.
        ratio = prom.query(dashboard_queries()[0][1])["result"]
        assert float(ratio[0]["value"][1]) > 0
        saved = prom.query('sum(mirror_served_bytes_total{source="cache"})')["result"]
        assert float(saved[0]["value"][1]) > 2 << 20

        # Prometheus loaded every alert rule and evaluates it without error, and
        # none fires on a healthy mirror. (Two pulls, half of them cold, may look like
        # a hit-ratio collapse for a moment: pending, never firing within its `for`.)
        with urllib.request.urlopen(prom.url + "/api/v1/rules?type=alert") as resp:
            groups = json.load(resp)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 12
        assert all(r["health"] == "ok" for r in rules), rules
        assert [r["name"] for r in rules if r["state"] == "firing"] == []
        pending = {r["name"] for r in rules if r["state"] == "pending"}
        assert pending <= {"MirrorHitRatioCollapse"}


def test_every_shared_store_panel_returns_data(real_upstream: RealUpstream, tmp_path: Path) -> None:
    """The "Shared store" row against a real mirror with store s3 (a real Ceph RGW and
    Redis): a cold pull (leads the downloads, uploads the blobs) and a warm one."""
    require_tool("prometheus")
    require_root("run the Ceph daemons")
    require_tool("radosgw")
    require_tool("redis-server")
    image = real_upstream.images["oci"]
    with (
        RadosGateway() as rgw,
        RedisServer(tmp_path / "redis") as redis,
    ):
        bucket = f"t{uuid.uuid4().hex[:12]}"
        rgw.create_bucket(bucket)
        port = free_port()
        env = {
            "MIRROR_STORE": "s3",
            "MIRROR_S3_BUCKET": bucket,
            "MIRROR_S3_ENDPOINT": rgw.endpoint,
            "MIRROR_S3_PATH_STYLE": "true",
            "MIRROR_S3_ACCESS_KEY_ID": rgw.credentials.access_key,
            "MIRROR_S3_SECRET_ACCESS_KEY": rgw.credentials.secret_key,
            "MIRROR_REDIS_URL": redis.url,
            "MIRROR_PEER_URL": f"http://127.0.0.1:{port}",
            "MIRROR_PEER_SECRET": secrets.token_hex(16),
        }
        with (
            MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env, port=port) as m,
            Prometheus(tmp_path / "prom", [m.host]) as prom,
        ):

            def pull(round_: str) -> None:
                result = skopeo_copy(
                    f"docker://{m.host}/{image.repo}:{image.tag}", f"oci:{tmp_path / round_}:x"
                )
                assert result.returncode == 0, result.stderr

            def wait_for(expr: str) -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    found = prom.query(expr)["result"]
                    if found and float(found[0]["value"][1]) > 0:
                        return
                    time.sleep(0.25)
                pytest.fail(f"Prometheus never saw {expr}\n{m.log_tail()}")

            pull("cold")
            # The last byte reaches the client before the commit (and the upload)
            # ends: the warm pull must find every blob committed, not still downloading.
            deadline = time.monotonic() + 30
            while m.metric("mirror_downloads_in_flight") > 0:
                assert time.monotonic() < deadline, m.log_tail()
                time.sleep(0.1)
            wait_for('sum(mirror_s3_requests_total{operation="upload",result="ok"})')
            pull("warm")
            wait_for('sum(mirror_shared_cache_hits_total{tier="l1"})')
            time.sleep(3)
            empty = [
                f"{title}: {q}"
                for title, q in dashboard_queries(shared=True)
                if not prom.query(q)["result"]
            ]
            assert not empty, "queries without data:\n" + "\n".join(empty)
            # What the panels show is what happened: this replica led the downloads,
            # and the warm pull's blobs came from its L1; nothing is degraded.
            acquired = prom.query('sum(mirror_download_leases_total{event="acquired"})')
            assert float(acquired["result"][0]["value"][1]) >= len(image.layer_digests)
            l1 = prom.query('sum(mirror_shared_cache_hits_total{tier="l1"})')["result"]
            assert float(l1[0]["value"][1]) >= len(image.layer_digests)
            degraded = prom.query("max(mirror_shared_degraded)")["result"]
            assert float(degraded[0]["value"][1]) == 0


def test_tls_alert_signals_return_data_from_a_tls_mirror(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    """The TLS alerts' series come from a mirror serving HTTPS, scraped on its plain
    admin listener as the central-tls overlay has Prometheus do."""
    require_tool("prometheus")
    ca = CA(tmp_path / "ca")
    server = ca.issue("mirror")
    env = {"MIRROR_TLS_CERT_FILE": str(server.cert), "MIRROR_TLS_KEY_FILE": str(server.key)}
    with (
        TLSMirror(tmp_path / "m", real_upstream.registry.url, ca, env) as mirror,
        Prometheus(
            tmp_path / "prom", [f"127.0.0.1:{mirror.admin_port}"], rule_files=[ALERTS]
        ) as prom,
    ):
        deadline = time.monotonic() + 30
        while not prom.query("mirror_tls_certificate_expiry_seconds")["result"]:
            assert time.monotonic() < deadline, "Prometheus never scraped the admin port"
            time.sleep(0.25)
        time.sleep(3)  # increase() needs two scrapes
        empty = [f"{a}: {q}" for a, q in alert_signals(tls=True) if not prom.query(q)["result"]]
        assert not empty, "queries without data:\n" + "\n".join(empty)
        left = prom.query("min(mirror_tls_certificate_expiry_seconds - time())")["result"]
        assert 3600 < float(left[0]["value"][1]) <= 86400  # the test CA's leaf: 1 day
