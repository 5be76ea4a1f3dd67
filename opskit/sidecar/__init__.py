"""The exporter sidecar: `/metrics` over the metering proxy, the active probe and the GPU collector.

Start reading at `exporter.py` (the command) and `exporter_server.py` (how the parts are wired on one
loop); the proxy's hot path is `proxy.py` (forwarding) with `metering.py` (accounting), between
`proxy_http.py` (client connections, push-parsed) and `upstream_client.py` (pool) with
`upstream_protocol.py` (one upstream connection's response parser). What a client may cost is bounded
by `proxy_http.py` on the proxy and by `http_guard.py` on `/metrics`."""
