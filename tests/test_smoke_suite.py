"""The real suite answers: submit, wait, results, ledger, events."""

from cortex.protocol import Client


def test_submit_and_wait_returns_result(shared_suite):
    with Client(shared_suite.home, timeout=20) as c:
        task = c.submit("echo", "say hi", payload={"x": 1}, tokens=10)
        done = c.wait(task["id"], timeout=20)
    assert done["state"] == "completed"
    assert done["result"] == {"x": 1}
