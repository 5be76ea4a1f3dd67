"""The exporter sidecar: `/metrics` over the metering proxy, the active probe and the GPU collector.

Start reading at `exporter.py` (the command and how the parts are wired); the proxy's hot path is
`proxy.py` (forwarding) with `metering.py` (accounting) over `upstream_client.py` (pool) and
`upstream_protocol.py` (one connection's response parser)."""
