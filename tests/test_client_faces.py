"""The two faces of the client library: the same operations (compared programmatically),
both exercised against a live suite, failing fast where no suite runs, riding out a
broker restart mid-call."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import threading
import typing
import uuid

import pytest

from cortex.protocol import AsyncClient, Client, errors, wire
from tests.conftest import short_home, wait_for

# --- the same operations on both faces ----------------------------------------------------


def public_methods(cls) -> dict:
    return {name: member for name, member in inspect.getmembers(cls, callable)
            if not name.startswith("_")}


def test_both_faces_expose_the_same_operations_with_the_same_parameters():
    sync, aio = public_methods(Client), public_methods(AsyncClient)
    assert set(sync) == set(aio)
    assert {"submit", "submit_and_wait", "wait", "status", "cancel", "list_tasks", "workers",
            "progress", "reserve", "commit", "release", "budget", "subscribe", "call",
            "close"} <= set(sync)
    for name in sync:
        # The same parameters (names, kinds, defaults, annotations).
        assert inspect.signature(sync[name]).parameters == \
            inspect.signature(aio[name]).parameters, name
        assert not inspect.iscoroutinefunction(sync[name]), name
        if inspect.iscoroutinefunction(aio[name]):
            continue
        # Otherwise the async face hands back an async iterator where the sync one hands
        # back an iterator (subscribe).
        gives_sync = typing.get_type_hints(sync[name])["return"]
        gives_async = typing.get_type_hints(aio[name])["return"]
        assert hasattr(gives_sync, "__next__") and not hasattr(gives_sync, "__anext__"), name
        assert hasattr(gives_async, "__anext__"), \
            f"AsyncClient.{name} is neither a coroutine nor gives an async iterator"
    assert not inspect.iscoroutinefunction(AsyncClient.subscribe)
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)


# --- both faces against a live suite --------------------------------------------------------


class SyncAsAsync:
    """The sync client dressed as the async one (its calls simply block), so one scenario
    exercises both faces."""

    def __init__(self, client: Client):
        self.client = client

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr
        if name == "subscribe":
            def events(*args, **kwargs):
                return IterateBlocking(attr(*args, **kwargs))
            return events

        async def method(*args, **kwargs):
            return attr(*args, **kwargs)
        return method


class IterateBlocking:
    """A sync subscription read with `async for` (each step simply blocks)."""

    def __init__(self, subscription):
        self.subscription = subscription

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self.subscription)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self):
        self.subscription.close()


def run_with(face: str, home, scenario, **options):
    """Run `scenario(client)` with a fresh client of `face` ("sync" or "async")."""
    agent = f"faces-{face}-{uuid.uuid4().hex[:6]}"

    async def main():
        if face == "sync":
            client = Client(home, agent=agent, **options)
            try:
                return await scenario(SyncAsAsync(client))
            finally:
                client.close()
        async with AsyncClient(home, agent=agent, **options) as client:
            return await scenario(client)

    return asyncio.run(main())


FACES = ["sync", "async"]


async def poll(ask, good, timeout: float, what: str):
    """Ask until the answer is good, or fail after `timeout` seconds (a poll with a
    deadline, like conftest.wait_for, for coroutines)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answer = await ask()
        if good(answer):
            return answer
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {answer}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("face", FACES)
def test_submit_then_wait(shared_suite, face):
    async def scenario(c):
        task = await c.submit("echo", "faces: submit", payload={"face": face}, tokens=5)
        assert task["state"] in ("queued", "dispatched", "running", "completed")
        assert (await c.status(task["id"]))["id"] == task["id"]
        done = await c.wait(task["id"], timeout=60)
        assert done["state"] == "completed" and done["final"] is True
        assert done["result"] == {"face": face}
        assert done["agent"] == c.agent
        again = await c.submit("echo", "faces: submit", payload={"face": face}, tokens=5,
                               idempotency_key=done["key"])
        assert again["id"] == task["id"]  # the same key and content: the same task
        with pytest.raises(errors.CortexError) as e:  # the same key, other content
            await c.submit("echo", "faces: other", idempotency_key=done["key"])
        assert e.value.code == "conflict"

    run_with(face, shared_suite.home, scenario)


def scheduler_holds_submits(home) -> bool:
    """Does this suite's scheduler hold a submit's answer (`wait`) until the task ends?"""
    with Client(home, timeout=60) as c:
        task = c.call("scheduler", "task.submit", {
            "type": "echo", "idempotency_key": uuid.uuid4().hex, "wait": 30}, timeout=60)
        c.wait(task["id"], timeout=60)
    return bool(task.get("final"))


@pytest.mark.parametrize("face", FACES)
def test_submit_and_wait_is_one_round_trip(shared_suite, face):
    if not scheduler_holds_submits(shared_suite.home):
        pytest.skip("the scheduler in this branch does not hold task.submit's `wait` yet")

    async def scenario(c):
        calls = []
        start = c._session.start if face == "async" else c.client._session.start

        def counting(request):
            calls.append(request.op)
            return start(request)

        if face == "async":
            c._session.start = counting
        else:
            c.client._session.start = counting
        done = await c.submit_and_wait("echo", "faces: one call", payload=[face], timeout=60)
        assert done["state"] == "completed" and done["result"] == [face]
        assert calls == ["task.submit"]

    run_with(face, shared_suite.home, scenario)


@pytest.mark.parametrize("face", FACES)
def test_a_submit_then_a_wait_for_it_is_one_request(shared_suite, face):
    async def scenario(c):
        owner = c if face == "async" else c.client
        sent, send = [], owner._send

        def recording(frames):
            op = wire.parse(frames).decoded()["op"]
            if op != "line.open":  # the sync face's ask for the direct line
                sent.append(op)
            return send(frames)

        owner._send = recording
        task = await c.submit("sleep", "faces: followed", payload={"seconds": 0.3})
        assert not task["final"]
        done = await c.wait(task["id"], timeout=60)
        assert done["state"] == "completed" and done["result"] == {"slept": 0.3}
        assert sent == ["task.submit"]  # the task's end came unasked
        quiet = await c.submit("sleep", "faces: not followed", payload={"seconds": 0.1},
                               follow=False)
        assert (await c.wait(quiet["id"], timeout=60))["state"] == "completed"
        assert sent == ["task.submit", "task.submit", "task.wait"]

    run_with(face, shared_suite.home, scenario)


@pytest.mark.parametrize("face", FACES)
def test_submit_and_wait_returns_the_ended_task(shared_suite, face):
    async def scenario(c):
        done = await c.submit_and_wait("sleep", "faces: longer", payload={"seconds": 0.3},
                                       timeout=60)
        assert done["state"] == "completed" and done["result"] == {"slept": 0.3}
        with pytest.raises(errors.TaskFailed) as info:
            await c.submit_and_wait("fail", "faces: meant to fail", retries=0, timeout=60,
                                    raise_on_failure=True)
        assert info.value.details["state"] in ("failed", "dead")

    run_with(face, shared_suite.home, scenario)


@pytest.mark.parametrize("face", FACES)
def test_cancel_list_and_workers(shared_suite, face):
    async def scenario(c):
        task = await c.submit("sleep", "faces: to cancel", payload={"seconds": 120})
        listed = await c.list_tasks(limit=1000)
        assert task["id"] in {t["id"] for t in listed}
        cancelled = await c.cancel(task["id"])
        assert cancelled["state"] == "cancelled"
        done = await c.wait(task["id"], timeout=30)
        assert done["state"] == "cancelled" and done["error"]["category"] == "cancelled"
        assert task["id"] in {t["id"] for t in await c.list_tasks(state="cancelled",
                                                                    limit=1000)}
        workers = await c.workers()
        assert workers and any("echo" in w["types"] for w in workers)
        with pytest.raises(errors.NotFound):
            await c.status("t-no-such-task")

    run_with(face, shared_suite.home, scenario)


@pytest.mark.parametrize("face", FACES)
def test_progress_of_a_running_task(shared_suite, face):
    async def scenario(c):
        task = await c.submit("sleep", "faces: progress", payload={"seconds": 60})
        try:
            running = await poll(lambda: c.status(task["id"]),
                                 lambda t: t["state"] == "running", 60, "the task running")
            reply = await c.progress(task["id"], running["attempt"], 0.5, "half way")
            assert reply["id"] == task["id"]
            now = await c.status(task["id"])
            assert now["progress"] == 0.5 and now["message"] == "half way"
        finally:
            await c.cancel(task["id"])

    run_with(face, shared_suite.home, scenario)


@pytest.mark.parametrize("face", FACES)
def test_reserve_commit_release_and_budget(shared_suite, face):
    async def scenario(c):
        first = f"ext-{uuid.uuid4().hex[:8]}"
        held = await c.reserve(first, 200, task_type="echo")
        assert held["granted"] is True
        committed = await c.commit(first, 150)
        assert (committed["committed"], committed["released"]) == (150, 50)
        second = f"ext-{uuid.uuid4().hex[:8]}"
        await c.reserve(second, 100)
        released = await c.release(second)
        assert released["task_id"] == second
        scopes = {b["scope"]: b for b in (await c.budget())["budgets"]}
        assert scopes["global"]["committed"] >= 150
        # A limit on this agent alone, then a reservation above it: refused, typed.
        await c.call("ledger", "ledger.set", {"scope": f"agent:{c.agent}", "limit": 1000})
        with pytest.raises(errors.BudgetExceeded) as info:
            await c.reserve(f"ext-{uuid.uuid4().hex[:8]}", 5000)
        assert info.value.code == "budget_exceeded" and info.value.details

    run_with(face, shared_suite.home, scenario)


@pytest.mark.parametrize("face", FACES)
def test_subscribe_sees_live_events(shared_suite, face):
    home = shared_suite.home
    stop = threading.Event()
    submitted: list[str] = []

    def producer():
        # Subscriptions take a moment to reach the router: keep making events until the
        # subscriber has seen one of ours.
        with Client(home, timeout=60) as p:
            while not stop.is_set():
                submitted.append(p.submit("echo", "faces: subscribe")["id"])
                stop.wait(0.2)

    async def scenario(c):
        thread = threading.Thread(target=producer, daemon=True)
        seen = None
        events = c.subscribe("task.completed", timeout=30)
        try:
            thread.start()
            async for event in events:
                assert event["type"].startswith("task.completed")
                if event.get("task") in submitted:
                    seen = event
                    break
        finally:
            await events.aclose()
            stop.set()
            thread.join(60)
        assert seen is not None, "no live task.completed event of ours within 30 s"
        async for _ in events:  # a closed subscription ends at once
            raise AssertionError("an event from a closed subscription")

    run_with(face, home, scenario)


# --- no suite: fail fast ---------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_no_suite_fails_fast_with_unavailable_naming_the_home(face):
    home = short_home()
    try:
        async def scenario(c):
            with pytest.raises(errors.Unavailable) as info:  # not Timeout after 60 s
                await c.submit("echo", "nobody there")
            assert str(home) in str(info.value) and "no suite is running" in str(info.value)
            with pytest.raises(errors.Unavailable):
                c.subscribe(timeout=60)  # refused when made, not when first read

        run_with(face, home, scenario, timeout=60)

        # A socket file left by a killed suite: nothing answers behind it.
        (home / "run").mkdir(mode=0o700, exist_ok=True)
        (home / "run" / "bus.sock").touch()

        async def stale(c):
            with pytest.raises(errors.Unavailable) as info:
                await c.status("t1")
            assert f"no suite is answering in {home}" in str(info.value)

        run_with(face, home, stale, timeout=60, connect_timeout=0.5)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- a broker restart in the middle of a call ---------------------------------------------


@pytest.mark.heavy  # a service killed or restarted: CI's second pass
def test_both_faces_ride_out_a_broker_restart_mid_call(suites):
    suite = suites.start(workers=2)
    broker_pid = {p["name"]: p for p in suite.processes()}["broker"]["pid"]

    def kill_broker_once_both_wait(*sessions) -> None:
        wait_for(lambda: all(s.calls for s in sessions), 30, "both waits in flight")
        os.kill(broker_pid, signal.SIGKILL)

    with Client(suite.home, timeout=120) as sync_client:
        sync_task = sync_client.submit("sleep", "sync face: broker dies",
                                       payload={"seconds": 3})

        async def async_side():
            async with AsyncClient(suite.home, timeout=120) as c:
                task = await c.submit("sleep", "async face: broker dies",
                                      payload={"seconds": 3})
                waiting = asyncio.ensure_future(c.wait(task["id"], timeout=120))
                killer = threading.Thread(target=kill_broker_once_both_wait,
                                          args=(c._session, sync_client._session))
                killer.start()
                sync_done = await asyncio.to_thread(sync_client.wait, sync_task["id"], 120)
                done = await waiting
                killer.join(60)
                return sync_done, done

        sync_done, async_done = asyncio.run(async_side())
    assert sync_done["state"] == "completed", sync_done
    assert async_done["state"] == "completed", async_done
    new_pid = wait_for(lambda: (p := {x["name"]: x for x in suite.processes()}["broker"])
                       ["statename"] == "RUNNING" and p["pid"], 60, "the broker restarted")
    assert new_pid != broker_pid
    suites.seen(suite)
