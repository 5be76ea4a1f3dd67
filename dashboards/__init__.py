"""Grafana dashboards as code (*.dashboard.py, built by `opskit generate dashboards` into generated/);
shipped with opskit."""
