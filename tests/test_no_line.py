"""Where the scheduler has no direct line (a tcp bus; a system without epoll or SEQPACKET
sockets; here CORTEX_PORTABLE=1 on the suite), a client's `line.open` is refused as
`no_line` at once, not `unavailable`, which the call machine pauses on and asks again
for two seconds (a stall of every call the client makes meanwhile), and the client never
asks again."""

from __future__ import annotations

import pytest

from cortex.protocol import Client, errors, wire
from cortex.protocol.client import LINE_AFTER_CALLS, LINE_RETRY_CALLS

from .conftest import suite_config


def test_a_scheduler_without_a_line_says_so_and_clients_stay_on_the_bus(suites,
                                                                        monkeypatch):
    monkeypatch.setenv("CORTEX_PORTABLE", "1")  # inherited by the suite's processes
    suite = suites.start(suite_config(1))
    with Client(suite.home, timeout=30) as c:
        with pytest.raises(errors.CortexError) as refused:
            c.call("scheduler", "line.open", {})
        assert refused.value.code == "no_line"
        asked, send = [], c._send

        def recording(frames):
            asked.append(wire.parse(frames).decoded()["op"])
            return send(frames)

        c._send = recording
        task = c.submit("echo", payload=1)
        for _ in range(LINE_AFTER_CALLS + LINE_RETRY_CALLS + 5):
            assert c.status(task["id"])["id"] == task["id"]
        assert asked.count("line.open") == 1  # refused once: never asked again
        assert c._line is None
