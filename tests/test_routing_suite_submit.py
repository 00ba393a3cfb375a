"""Type "auto" on the submit path (pure: SchedulerState with a router trained on the
generator): a routed task runs as the chosen type and records the decision (type,
confidence, runner-up) with the task and in its task.created event; below the bar it
goes to the fallback, or is refused with the candidates (and a re-sent copy gets the
same refusal); with no router it is refused with the reason; typed submits count toward
the next retrain, which starts in the background once enough came."""

from __future__ import annotations

import sys

import pytest

from cortex.loadtest.routing_data import labelled_descriptions
from cortex.protocol import wire
from cortex.services.runtime.settings import RoutingSettings, SchedulerSettings
from cortex.services.scheduler import classify
from cortex.services.scheduler.feasibility import ResourceMonitor
from cortex.services.scheduler.routing import Routing
from cortex.services.scheduler.state import SchedulerState
from cortex.services.scheduler.trainer import LULL_SECONDS
from tests.test_scheduling import IDLE_MACHINE, Midpoint, Sim, answer, events

CLEAR = "Please translate the release notes into German"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    classify.save(classify.train(labelled_descriptions(400, 3)), home / "models")
    return home


def sim_with(home, **routing) -> tuple[Sim, Routing]:
    sim = Sim()
    router = Routing(home, RoutingSettings(**routing), classify.load)
    sim.state = SchedulerState(SchedulerSettings(), monitor=ResourceMonitor(
        lambda: IDLE_MACHINE), rng=Midpoint(), routing=router)
    return sim, router


def test_an_auto_task_runs_as_the_chosen_type_and_records_why(models):
    sim, _ = sim_with(models)
    task = sim.add(type="auto", description=CLEAR)
    assert task.type == "translate"
    routing = task.routing
    assert routing["outcome"] == "routed" and routing["chosen"] == "translate"
    assert routing["confidence"] > 0.5 and routing["runner_up"] not in (None, "translate")
    assert len(routing["top"]) == 3
    (_, data, task_id, _), = events(sim.effects[-1], "task.created")
    assert task_id == task.id and data["type"] == "translate" and data["routing"] == routing
    assert task.summary()["routing"] == routing  # what task.status and `task show` get
    typed = sim.add(type="translate", description="translate this into French")
    created = [e for e in events(sim.effects[-1], "task.created") if e[2] == typed.id]
    assert typed.routing is None and "routing" not in created[0][1]


def test_below_the_bar_a_task_goes_to_the_fallback(models):
    sim, router = sim_with(models, min_confidence=0.999, fallback="echo")
    task = sim.add(type="auto", description=CLEAR)
    assert task.type == "echo"
    assert task.routing["outcome"] == "fallback" and task.routing["chosen"] == "translate"
    assert router.status()["decisions"] == {"routed": 0, "fallback": 1, "refused": 0}


def test_below_the_bar_without_a_fallback_it_is_refused_with_the_candidates(models):
    sim, _ = sim_with(models, min_confidence=0.999)
    body = {"idempotency_key": "k-unsure", "type": "auto", "description": CLEAR}
    fx = sim.turn(sim.state.submit, b"client", b"c1", dict(body), sim.now)
    kind, error = answer(fx, b"client")
    assert kind == wire.ERROR and error["code"] == "rejected"
    assert "translate" in error["message"] and "give the type" in error["message"]
    assert error["message"].count(",") >= 2  # the top 3 candidates with their probabilities
    assert not sim.state.tasks
    again = sim.turn(sim.state.submit, b"client", b"c2", dict(body), sim.now)
    assert answer(again, b"client") == (kind, error)  # a re-sent copy: the same refusal


def test_with_no_router_an_auto_task_is_refused_with_the_reason(tmp_path):
    sim, router = sim_with(tmp_path)
    kind, error = answer(sim.submit(type="auto", description=CLEAR))
    assert kind == wire.ERROR and error["code"] == "rejected"
    assert "no routing model yet" in error["message"]
    assert router.status()["trained"] is False


def test_typed_submits_start_a_background_retrain(tmp_path):
    sim, router = sim_with(tmp_path, retrain_every=3)
    router.trainer.command = [sys.executable, "-c", "print('{}')"]  # a child that fits nothing
    for _ in range(2):
        sim.add(type="echo", description="hello")
    router.maybe_train(sim.now.mono)
    assert not router.trainer.busy
    sim.add(type="echo", description="hello")
    assert router.status()["typed_since_training"] == 3
    router.maybe_train(sim.now.mono)
    assert not router.trainer.busy  # one type: nothing a router could learn
    assert router.status()["history_can_teach"] is False
    sim.add(type="translate", description="translate this")
    router.maybe_train(sim.now.mono, queued=True)
    assert not router.trainer.busy and router.trainer.status()["waiting_for_lull"]
    router.maybe_train(sim.now.mono, queued=False)  # a lull begins
    assert not router.trainer.busy
    router.maybe_train(sim.now.mono + LULL_SECONDS, queued=False)
    assert router.trainer.busy
    router.trainer.stop()


def test_typed_submits_without_a_description_teach_nothing(tmp_path):
    sim, router = sim_with(tmp_path, retrain_every=2)
    for i in range(4):
        sim.add(type=("echo", "translate")[i % 2], description="")
    assert router.status()["typed_since_training"] == 0
    assert router.status()["history_can_teach"] is False
    router.maybe_train(sim.now.mono)
    assert not router.trainer.busy
