"""The floor every flow stands on: the metric catalogue and thresholds, configuration and its errors,
call records, SSE parsing, auth, ready files, process supervision and the shared click helpers.

Nothing here imports a flow (sidecar, loadtest, opscode, live, mock)."""
