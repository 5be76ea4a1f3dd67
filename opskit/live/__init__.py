"""The live stack on loopback (mock, exporter, Prometheus, Alertmanager, alert receiver) and the fire
drill that breaks it on purpose and times each alert. Start at `stack.py`, then `drill.py`."""
