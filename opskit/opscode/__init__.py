"""Operations as code: the alert rules, Alertmanager routing, Grafana dashboards and Kubernetes
manifests, generated from the catalogue and the thresholds (`opskit generate ...`, see `generate.py`)."""
