"""qps: open-loop arrival rate (fixed, Poisson, or a stepped ramp), held even when the target slows down.

One scheduler user per Locust process sends this process's share of the schedule; latency is measured
from each request's scheduled send time, and the report compares achieved with requested rate.
Run through `opskit loadtest qps --rate 50 --arrival poisson`, or by hand (web UI) with
`OPSKIT_TARGET_URL=http://127.0.0.1:8000 locust -f loadtests/qps.py -u 1` (the defaults of RunParams).
"""

from opskit.loadtest.users import OpenLoopUser


class Qps(OpenLoopUser):
    """The open-loop scheduler for this process."""
