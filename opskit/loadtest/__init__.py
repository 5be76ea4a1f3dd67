"""Load tests as a release gate: Locust scenarios, opskit's own request log, pandas results, SLO verdicts.

Flow: `runner` starts Locust (always as a subprocess: `import locust` monkey-patches the standard
library with gevent) with one of the locustfiles under `loadtests/`; inside those processes `users` and
`client` send the requests and write every one of them to the per-request log (`log`) at
`time.perf_counter()` precision. Afterwards `results` reads the log into a DataFrame, `slo.evaluate`
turns it into a `Verdict`, and `report` renders it as text and as a self-contained HTML page.

Only `users` imports locust; every other module here is safe to import anywhere.
"""
