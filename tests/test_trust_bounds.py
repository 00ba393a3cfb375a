"""Bounds: finished tasks keep a bounded size (payload and result leave memory after a
time or past a size, and stay readable from the event log), `events.recent` pages with
replies that fit one message, an oversized reply is answered `too_large` to the one who
asked, a peer that never reads is cut off past a bound in bytes (one that reads is
not), and connections past a lowered cap are refused while the broker keeps serving."""

from __future__ import annotations

import msgpack
import psutil
import pytest
import zmq

from cortex.protocol import Client, wire
from cortex.protocol.peer import make_socket
from cortex.protocol.publisher import BATCH_BYTES, EventPublisher
from cortex.services.events.process import PagedRing, lean
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.table import TaskTable
from cortex.services.scheduler.tasks import State, Task

from .conftest import wait_for
from .trust_peers import RawPeer

NOW = Now(1_700_000_000.0, 100.0)
KIB = 1024


# -- finished tasks: bounded, the logic alone ------------------------------------------
def finish(table: TaskTable, task_id: str, at: Now, size: int = 0, result=None) -> Task:
    task = Task(id=task_id, type="echo", description="", priority="medium", tokens=0,
                timeout=30.0, retries=0, agent="a", key=f"k-{task_id}",
                payload="p" * size, size=size, times={"created": at.wall})
    fx = Effects()
    table.add(fx, task, at)
    table.move(fx, task, State.DISPATCHED, at, worker="w1")
    table.move(fx, task, State.COMPLETED, at, result=result if result is not None else
               "r" * size)
    return task


def test_a_finished_task_keeps_its_result_for_keep_results_seconds_then_is_trimmed():
    table = TaskTable(100, {"submitted": 0}, keep_results=60.0, keep_results_mb=64.0)
    old = finish(table, "t1", NOW, size=10)
    assert (old.payload, old.result, old.trimmed) == ("p" * 10, "r" * 10, False)
    finish(table, "t2", NOW + 30)
    assert not old.trimmed
    newer = finish(table, "t3", NOW + 61)  # a change past the minute trims the first
    assert (old.payload, old.result, old.trimmed) == (None, None, True)
    assert old.summary()["trimmed"] and old.state is State.COMPLETED
    assert newer.result is not None and table.counters["trimmed"] == 1


def test_a_task_list_of_long_descriptions_fits_one_message_with_the_latest_tasks():
    """500 queued tasks with 8 KiB descriptions (4 MiB): the reply keeps the newest that
    fit one message, says it was cut, and still counts every match."""
    table = TaskTable(1000, {"submitted": 0}, keep_results=60.0, keep_results_mb=64.0)
    for i in range(500):
        table.add(Effects(), Task(id=f"t{i:03}", type="echo", description="d" * 8192,
                                  priority="medium", tokens=0, timeout=30.0, retries=0,
                                  agent="a", key=f"k{i}", times={"created": NOW.wall}), NOW)
    for newest in (False, True):
        reply = table.listing({"state": "queued", "limit": 500, "newest": newest})
        ids = [t["id"] for t in reply["tasks"]]
        assert len(wire.encode_body(reply)) <= wire.MAX_MESSAGE_BYTES
        assert 50 < len(ids) < 500 and reply["cut_to_fit"] and reply["truncated"]
        assert reply["total"] == 500
        latest = [f"t{i:03}" for i in range(500 - len(ids), 500)]
        assert ids == (latest[::-1] if newest else latest)
    small = table.listing({"limit": 5})
    assert [t["id"] for t in small["tasks"]] == [f"t{i}" for i in range(495, 500)]
    assert small["truncated"] and not small["cut_to_fit"]


def test_a_wait_answer_leaves_out_a_payload_that_would_not_fit_with_its_result():
    big = finish(TaskTable(10, {"submitted": 0}), "t1", NOW, size=520 * KIB)
    answer = big.answer()
    assert answer["payload"] is None and answer["payload_omitted"]
    assert answer["result"] == "r" * (520 * KIB)
    assert len(wire.encode_body(answer)) <= wire.MAX_MESSAGE_BYTES
    assert big.payload is not None and big.summary()["payload"] is not None  # status: all
    small = finish(TaskTable(10, {"submitted": 0}), "t2", NOW, size=300 * KIB)
    assert small.answer()["payload"] == "p" * (300 * KIB)  # together they fit: kept
    assert "payload_omitted" not in small.answer()


def test_finished_tasks_past_keep_results_mb_are_trimmed_oldest_first_never_the_newest():
    table = TaskTable(1000, {"submitted": 0}, keep_results=3600.0, keep_results_mb=1.0)
    tasks = [finish(table, f"t{i}", NOW + i, size=200 * KIB) for i in range(10)]
    kept = [t for t in tasks if not t.trimmed]
    assert table.held_bytes <= (1 << 20) + 400 * KIB  # the cap and the one just finished
    assert tasks[-1] in kept and all(t.trimmed for t in tasks[:len(tasks) - len(kept)])
    assert 1 <= len(kept) <= 3  # 400 KiB each (payload and result)


def test_trimming_is_applied_again_after_recovery():
    table = TaskTable(100, {"submitted": 0}, keep_results=60.0)
    fx = Effects()
    task = Task(id="t1", type="echo", description="", priority="medium", tokens=0,
                timeout=30.0, retries=0, agent="a", key="k", payload="p", size=1,
                times={"created": NOW.wall})
    table.add(fx, task, NOW)
    table.move(fx, task, State.DISPATCHED, NOW)
    table.move(fx, task, State.COMPLETED, NOW, result="r")
    fresh = TaskTable(100, {}, keep_results=60.0)
    for record in fx.records:
        fresh.apply(record)
    fresh.finished["t1"] = None
    fresh.recovered((NOW + 120).wall)
    assert fresh.tasks["t1"].trimmed and fresh.tasks["t1"].result is None


# -- events: paging, batches ---------------------------------------------------------------
def big_event(i: int, size: int) -> dict:
    return {"id": f"s:1:{i}", "type": "task.progress" if i % 2 else "task.created",
            "data": {"blob": "x" * size}}


def test_events_recent_pages_back_with_replies_that_fit_one_message():
    ring = PagedRing(1000)
    ring.extend([big_event(i, 100 * KIB) for i in range(100)])
    seen, before, pages = [], None, 0
    while True:
        page = ring.page(10_000, None, before)
        pages += 1
        assert len(msgpack.packb(page)) < wire.MAX_MESSAGE_BYTES
        seen = page["events"] + seen
        if not page["more"]:
            break
        before = page["before"]
    assert [e["id"] for e in seen] == [f"s:1:{i}" for i in range(100)] and pages >= 10
    typed = ring.page(5, "task.created")
    assert [e["id"] for e in typed["events"]] == [f"s:1:{i}" for i in range(90, 100, 2)]
    assert typed["more"]


def test_results_stay_in_the_log_and_the_publisher_splits_batches_by_bytes():
    event = {"id": "a", "type": "task.completed", "data": {"result": "x" * 500_000}}
    assert lean(event)["data"] == {"result": None, "result_in_log": True}
    assert event["data"]["result"] == "x" * 500_000  # the logged event is untouched

    ctx = zmq.Context.instance()
    sink = make_socket(ctx, zmq.ROUTER)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    publisher = EventPublisher(ctx, f"tcp://127.0.0.1:{port}", "t", 1, secret="s")
    try:
        for i in range(6):
            publisher.emit("task.completed", {"result": "y" * 400_000}, task=f"t{i}")
        publisher.flush()
        got = []
        while len(got) < 6:
            assert sink.poll(10_000)
            parts = sink.recv_multipart()
            msg = wire.parse(parts[1:])  # every batch passes the size check
            assert len(msg.body) <= BATCH_BYTES
            got += msg.decoded()["events"]
        assert [e["task"] for e in got] == [f"t{i}" for i in range(6)]
    finally:
        publisher.close()
        sink.close(linger=0)


# -- on a live suite -------------------------------------------------------------------------
def config(scheduler: str, workers: int = 4) -> str:
    return ('[suite]\nfsync = "off"\nheartbeat_interval = 0.5\nsnapshot_interval = 2.0\n'
            f'[scheduler]\ntask_heartbeat = 1.0\n{scheduler}\n'
            f'[pool.groups.default]\ncount = {workers}\ntypes = ["echo", "sleep"]\n')


def test_a_trimmed_task_says_so_and_the_client_reads_its_result_from_the_log(suites):
    suite = suites.start(config("keep_results = 0"))
    with Client(suite.home, timeout=60) as c:
        first = c.submit_and_wait("echo", "first", payload={"big": "z" * 200_000},
                                  timeout=60)
        assert first["result"] == {"big": "z" * 200_000}  # the one finishing: kept
        second = c.submit_and_wait("echo", "second", payload="two", timeout=60)
        raw = c.call("scheduler", "task.status", {"id": first["id"]})
        assert raw["trimmed"] and raw["payload"] is None and raw["result"] is None
        # The completion reaches the log a moment after its acknowledgement (trimmed at
        # once here, keep_results = 0): the library reads it from there once it is in.
        wait_for(lambda: c.call("events", "events.query", {
            "task": first["id"], "type": "task.completed", "limit": 1})["events"], 30,
            "the first task's completion in the event log")
        again = c.status(first["id"])  # the library reads the result from the event log
        assert again["trimmed"] and again["result"] == {"big": "z" * 200_000}
        assert c.wait(first["id"], timeout=30)["result"] == {"big": "z" * 200_000}
        assert c.status(second["id"])["result"] == "two"
        recent = c.call("events", "events.recent", {"n": 10_000})
        done = [e for e in recent["events"] if e["type"] == "task.completed"]
        assert done and all(e["data"]["result_in_log"] for e in done)
    # The dashboard's task page shows the result the log keeps.
    import urllib.request

    import orjson

    url = (suite.home / "run" / "dashboard.url").read_text().strip()
    base, _, token = url.partition("/?token=")
    request = urllib.request.Request(f"{base}/api/task/{first['id']}",
                                     headers={"X-Cortex-Token": token})

    def shown():  # the trace is read from the log, which may be a moment behind
        with urllib.request.urlopen(request, timeout=30) as response:
            task = orjson.loads(response.read())["task"]
        return task if task.get("result") is not None else None
    task = wait_for(shown, 30, "the result on the dashboard's task page")
    assert task["trimmed"] and task["result"] == {"big": "z" * 200_000}


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1 << 20)


def dir_mb(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 20)


@pytest.mark.heavy
def test_a_thousand_half_mib_payloads_keep_the_scheduler_and_its_state_bounded(suites):
    suite = suites.start(config("keep_results = 60\nkeep_results_mb = 32", workers=2))
    payload = {"blob": "q" * (500 * KIB)}
    with Client(suite.home, timeout=120) as c:
        pid = c.call("scheduler", "scheduler.status")["pid"]
        start = rss_mb(pid)
        ids = []
        for i in range(1000):
            ids.append(c.submit("echo", f"big {i}", payload=payload)["id"])
            if i % 50 == 49:  # keep the queue short: the test is about finished tasks
                c.wait(ids[-1], timeout=300)
        for task_id in ids[-5:]:
            c.wait(task_id, timeout=300)
        wait_for(lambda: c.call("scheduler", "scheduler.status")["states"].get(
            "completed", 0) >= 1000, 600, "every task completed")
        peak = rss_mb(pid)
        state = dir_mb(suite.home / "state")
        counters = c.call("scheduler", "scheduler.status")["counters"]
        first = c.status(ids[0])
        assert first["trimmed"] and first["result"] == payload  # from the event log
    print(f"scheduler rss {start:.0f} -> {peak:.0f} MiB, state/ {state:.1f} MiB, "
          f"trimmed {counters.get('trimmed')}, wal {dir_mb(suite.home / 'wal'):.1f} MiB, "
          f"events {dir_mb(suite.home / 'events'):.0f} MiB")
    assert counters.get("trimmed", 0) >= 900
    assert peak - start < 400 and state < 100


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_a_reply_over_the_limit_is_too_large_to_the_requester_and_recent_pages(suites):
    suite = suites.start()
    tasks = 450  # 8 KiB descriptions: task.list of them all passes 1 MiB, as do their events
    with Client(suite.home, timeout=60) as c:
        for i in range(tasks):
            c.submit("echo", "d" * 8000, payload=i)
        # Its payload and its result (echoed) each fit a message (payloads to 512 KiB),
        # both together with an 8 KB description do not.
        big = c.submit_and_wait("echo", "d" * 8000, payload="b" * 524_000, timeout=120)
        # The submitter gets its result; the payload it sent is left out of the answer.
        assert big["result"] == "b" * 524_000 and big["payload_omitted"]
        assert big["payload"] is None
        wait_for(lambda: c.call("scheduler", "scheduler.status")["states"].get(
            "completed", 0) >= tasks + 1, 120, "the tasks")
    peer = RawPeer(suite.home, "client")
    try:
        kind, body = peer.request("scheduler", {"op": "task.status", "id": big["id"]})
        assert (kind, body["code"]) == (wire.ERROR, "too_large"), body  # to us, at once
        kind, listed = peer.request("scheduler", {"op": "task.list", "limit": 10_000})
        assert kind == wire.REPLY and listed["cut_to_fit"] and listed["total"] == tasks + 1
        kind, page = peer.request("events", {"op": "events.recent", "n": 10_000})
        assert kind == wire.REPLY and page["more"], "the ring should need more than a page"
        before, events, pages = page["before"], page["events"], 1
        while page["more"]:
            kind, page = peer.request("events", {"op": "events.recent", "n": 10_000,
                                                 "before": before})
            assert kind == wire.REPLY
            events, before, pages = page["events"] + events, page["before"], pages + 1
        assert sum(e["type"] == "task.created" for e in events) >= tasks and pages >= 2
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids))  # no event twice across pages
        kind, broker = peer.request("broker", {"op": "broker.status"})
        assert broker["stats"]["too_large"] >= 1
    finally:
        peer.close()


def peer_named(client: Client, name: str) -> dict | None:
    return next((p for p in client.call("broker", "broker.peers")["peers"]
                 if p["name"] == name), None)


@pytest.mark.heavy
@pytest.mark.timeout(600)  # 200 replies of ~900 KiB, then 400 unread, on 2 shared cores
def test_a_peer_that_never_reads_is_cut_off_past_the_byte_bound_and_a_fast_reader_never(
        suites):
    suite = suites.start(extra="[bus]\nmax_unread_mb = 16\n")
    with Client(suite.home, timeout=60) as c:
        for _ in range(300):
            c.submit("echo", "f" * 4000, payload="x" * 2000)
        broker = c.call("broker", "broker.status")["pid"]
    # A fast reader: 200 replies of most of a MiB each, far past the bound in all, read
    # as they come (its link echoes the broker's probes).
    with Client(suite.home, timeout=60) as reader:
        sizes = [len(msgpack.packb(reader.call("events", "events.recent", {"n": 10_000})))
                 for _ in range(200)]
        seen = peer_named(reader, reader.name)
        status = reader.call("broker", "broker.status")
    print(f"fast reader: 200 replies of {min(sizes) // KIB}-{max(sizes) // KIB} KiB; "
          f"broker saw {seen['sent'] >> 20} MiB sent, {seen['unread'] >> 10} KiB unread")
    assert min(sizes) > 600 * KIB and seen["sent"] > 100 << 20
    assert seen["unread"] <= 16 << 20 and status["stats"]["slow_readers"] == 0

    before = rss_mb(broker)
    peer = RawPeer(suite.home, "client")
    try:
        peer.socket.setsockopt(zmq.RCVHWM, 10)  # it reads nothing: let its queue fill
        # Re-sent requests (one corr) pass the in-flight bound: only bytes bound them.
        for _ in range(400):
            peer.socket.send_multipart(wire.frames(wire.REQUEST, b"events", b"same",
                                                   {"op": "events.recent", "n": 10_000}))
        with Client(suite.home, timeout=60) as c:
            status = wait_for(lambda: (s := c.call("broker", "broker.status"))["stats"][
                "slow_readers"] >= 1 and s, 300, "the slow reader cut off")
            assert peer_named(c, peer.name) is None  # forgotten
            grown = rss_mb(broker) - before
            done = c.submit_and_wait("echo", "after", payload="ok", timeout=120)
            assert done["state"] == "completed"  # the bus still serves
    finally:
        peer.socket.close(linger=0)
    print(f"broker rss grew {grown:.0f} MiB past a 16 MiB bound; stats {status['stats']}")
    # The events service answered the 400 costly requests in many short turns, beating
    # between them: the broker never took it (or any service) for lost.
    assert status["stats"]["lost_peers"] == 0
    assert grown < 200  # 400 replies of ~1 MiB would be 400 MiB unbounded


def test_connections_past_a_lowered_cap_are_refused_and_the_broker_serves_on(suites):
    suite = suites.start(extra="[bus]\nmax_connections = 40\n")
    peer = RawPeer(suite.home, "client")  # connected before the flood: inside the cap
    ctx = zmq.Context()
    sockets = []
    try:
        _, before = peer.request("broker", {"op": "broker.status"})
        for _ in range(120):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{suite.home}/run/bus.sock")
            sockets.append(s)

        def refused():
            _, status = peer.request("broker", {"op": "broker.status"})
            held = status["connections"]
            return status if held["refused"] >= 60 and held["open"] <= held["cap"] else None
        status = wait_for(refused, 60, "the connections past the cap refused")
        assert status["pid"] == before["pid"]
        kind, _ = peer.request("scheduler", {"op": "scheduler.status"})
        assert kind == wire.REPLY  # those inside are served
    finally:
        for s in sockets:
            s.close()
        ctx.term()
        peer.close()
    with Client(suite.home, timeout=60) as c:  # room again: a new client is served
        done = c.submit_and_wait("echo", "after the flood", payload=1, timeout=60)
        assert done["result"] == 1
        assert c.call("broker", "broker.status")["pid"] == before["pid"]


@pytest.mark.parametrize("endpoint,kind", [("events_in", zmq.DEALER),
                                           ("events_live", zmq.SUB)])
def test_the_event_routers_sockets_refuse_connections_past_the_cap(shared_capped, endpoint,
                                                                   kind):
    from cortex.protocol import locate

    home = shared_capped.home
    with Client(home, timeout=60) as c:
        before = c.call("events", "events.status")
        ctx = zmq.Context()
        sockets = []
        try:
            for _ in range(120):
                s = ctx.socket(kind)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(locate.endpoints(home)[endpoint])
                sockets.append(s)

            def refused():
                status = c.call("events", "events.status")
                held = status["connections"][endpoint]
                return status if held["refused"] >= 60 and held["open"] <= held["cap"] \
                    else None
            status = wait_for(refused, 60, f"the connections to {endpoint} past the cap")
        finally:
            for s in sockets:
                s.close()
            ctx.term()
        assert status["pid"] == before["pid"]  # the router lives, and serves:
        done = c.submit_and_wait("echo", "after the flood", payload=2, timeout=60)
        assert done["result"] == 2


@pytest.fixture(scope="module")
def shared_capped():
    from .conftest import SuiteRunner

    runner = SuiteRunner()
    try:
        yield runner.start(extra="[bus]\nmax_connections = 40\n")
    finally:
        problems = runner.stop_all()
        assert not problems, problems
