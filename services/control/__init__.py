"""Starting, checking and stopping a suite: the public API for tools that drive Cortex
as a user does (the load-test harness, tests, scripts). Everything else under
`cortex.services` is the suite's own."""

from .suite import SERVICES, Suite, SuiteError, become_subreaper, reap_orphans, zombies

__all__ = ["SERVICES", "Suite", "SuiteError", "become_subreaper", "reap_orphans", "zombies"]
