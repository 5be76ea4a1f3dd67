"""The exporter sidecar: `/metrics` over the metering proxy, the active probe and the GPU collector.

Start reading at `exporter.py` (the command) and `exporter_server.py` (how the parts are wired on one
loop); the proxy's hot path is `proxy.py` (forwarding) with `metering.py` (accounting) over
`upstream_client.py` (pool) and `upstream_protocol.py` (one connection's response parser). What a
client may cost either listener is bounded by `http_guard.py` and, for request bodies, `request_body.py`."""
