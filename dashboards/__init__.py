"""Grafana dashboards as code (grafanalib): *.dashboard.py, panel helpers, and build.py which writes
the JSON and Grafana provisioning files under dashboards/generated/."""
