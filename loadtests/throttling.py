"""throttling: offer more than the target's rate limit and back off like a well-behaved client.

Users together offer `overdrive` (2x) the advertised requests per window; on 429 a client waits
Retry-After (else capped exponential back-off with jitter) and retries. The gate FAILS when the target
accepts more than its limit, answers 429 without Retry-After, or answers 5xx while throttling.
"""

from opskit.loadtest.users import ThrottledUser


class Throttling(ThrottledUser):
    """A client that backs off when throttled."""
