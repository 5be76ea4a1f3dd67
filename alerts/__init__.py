"""Prometheus alert rules and Alertmanager routing for opskit, generated from opskit.thresholds."""
