"""deploy/prometheus/prometheusrule.yaml from deploy/prometheus/alerts.yaml: the same rules
as a PrometheusRule (Prometheus Operator). tests/deploy checks the file is up to date;
after changing the alerts, write it again with `.venv/bin/python -m tests.deploy.prometheusrule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
PROMETHEUS_RULE = PROMETHEUS / "prometheusrule.yaml"

HEADER = """\
# GENERATED from alerts.yaml by `.venv/bin/python -m tests.deploy.prometheusrule`: edit
# alerts.yaml, then run that (tests/deploy fails while this file is out of date).
# The alerts as a PrometheusRule for the Prometheus Operator: kubectl apply -k deploy/prometheus
# (kustomization.yaml there sets the runbook links' base URL).
"""


def build() -> dict[str, Any]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "otelworker", "labels": {"app.kubernetes.io/name": "otelworker"}},
        "spec": {"groups": rules["groups"]},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def text() -> str:
    body = yaml.dump(build(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(text())
    print(f"wrote {PROMETHEUS_RULE}")
