"""A budget set at run time reaches the scheduler's admission before any submit that
follows it (the ledger tells the scheduler as it sets one), on the real suite."""

from __future__ import annotations

import pytest

from cortex.protocol import Client, errors

BASE = ('[suite]\nfsync = "off"\nheartbeat_interval = 0.5\nsnapshot_interval = 2.0\n'
        '[dashboard]\nenabled = false\n[scheduler]\ntask_heartbeat = 1.0\n')


def test_a_submit_right_after_a_windowless_limit_changes_meets_the_new_limit(suites):
    suite = suites.start(config=BASE + (
        '[ledger]\nbudget = 100000\n'
        '[ledger.budgets."agent:small"]\nlimit = 300\n'
        '[pool.groups.default]\ncount = 1\ntypes = ["echo"]\n'))
    with Client(suite.home, timeout=60, agent="small") as c:
        with pytest.raises(errors.BudgetExceeded, match="agent:small"):
            c.submit("echo", "above the agent's limit", tokens=1000)
        for _ in range(3):  # each change is met by the very next submit, both ways
            c.call("ledger", "ledger.set", {"scope": "agent:small", "limit": 2000,
                                            "window": None})
            task = c.submit("echo", "within the raised limit", tokens=1000)
            assert task["state"] in ("queued", "running", "completed"), task
            c.call("ledger", "ledger.set", {"scope": "agent:small", "limit": 300,
                                            "window": None})
            with pytest.raises(errors.BudgetExceeded, match="agent:small"):
                c.submit("echo", "above the lowered limit", tokens=1000)
