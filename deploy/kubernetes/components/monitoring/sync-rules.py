"""Regenerate prometheusrule.yaml from deploy/prometheus/alerts.yml (the one source)."""

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[2] / "prometheus" / "alerts.yml"

HEADER = (
    "# Generated from deploy/prometheus/alerts.yml (tests/test_k8s.py keeps them equal):\n"
    "#   python3 deploy/kubernetes/components/monitoring/sync-rules.py\n"
)


def render() -> str:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "registry-mirror", "labels": {"release": "kube-prometheus-stack"}},
        "spec": yaml.safe_load(ALERTS.read_text()),
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=100)


if __name__ == "__main__":
    (HERE / "prometheusrule.yaml").write_text(render())
