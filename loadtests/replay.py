"""replay: a recorded trace's requests at their recorded offsets (open loop), with the recorded model,
stream flag, lengths and shared prefixes.

Run through `opskit loadtest replay --trace FILE`, which parses the trace and writes the schedule each
Locust process reads (<run>/replay/schedule.jsonl); this file has no schedule of its own.
"""

from opskit.loadtest.replay_user import ReplayUser


class Replay(ReplayUser):
    """The replay scheduler for this process."""
