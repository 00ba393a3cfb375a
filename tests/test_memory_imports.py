"""Each process loads what it uses, and no more: a pooled worker (twenty of them in a
default suite), forked from the pool so that it shares the pool's code, and the services
are spared asyncio, ssl, psutil and the numeric stack; the scheduler loads numpy only once
it has a saved model to predict with, and scikit-learn only once it has a router."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from cortex.protocol import Client

from .conftest import wait_for

NUMERIC = {"numpy", "scipy", "sklearn", "joblib"}
CLIENT_ONLY = {"asyncio", "ssl"}  # the clients' async face brings them in
# module -> what it must not import
NOT_LOADED = {
    "cortex.services.pool.worker": NUMERIC | CLIENT_ONLY | {"psutil", "subprocess"},
    "cortex.services.broker.process": NUMERIC | CLIENT_ONLY | {"psutil"},
    "cortex.services.ledger.process": NUMERIC | CLIENT_ONLY | {"psutil"},
    "cortex.services.listener.process": NUMERIC | CLIENT_ONLY | {"psutil"},
    "cortex.services.pool.process": NUMERIC | CLIENT_ONLY,
    "cortex.services.events.process": NUMERIC | {"asyncio"},
    "cortex.services.scheduler.process": NUMERIC | CLIENT_ONLY,
}
# Native libraries that show in a process's memory map when it loaded them.
HEAVY_LIBRARIES = ("numpy", "scipy", "sklearn", "openblas", "_asyncio", "_ssl.", "psutil")


def imported_by(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing `module`."""
    code = (f"import importlib, json, sys\nimportlib.import_module({module!r})\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", sorted(NOT_LOADED))
def test_a_process_module_imports_nothing_it_does_not_use(module):
    loaded = imported_by(module) - {"json"}  # json: the probe's own
    assert NOT_LOADED[module] & loaded == set()


def test_the_protocol_package_loads_its_clients_on_first_use():
    loaded = imported_by("cortex.protocol.wire")
    assert {"cortex.protocol.client", "asyncio"} & loaded == set()
    code = ("import sys\nfrom cortex.protocol import Client, Worker, CortexError\n"
            "assert Client.__module__ == 'cortex.protocol.client'\n"
            "assert Worker.__module__ == 'cortex.protocol.worker'\n"
            "assert CortexError.__module__ == 'cortex.protocol.errors'\n"
            "import cortex.protocol as p\nassert 'Client' in dir(p)\n"
            "try:\n    p.NoSuchName\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


def mapped_libraries(pid: int) -> set[str]:
    """The heavy native libraries mapped into process `pid`."""
    paths = {m.path for m in psutil.Process(pid).memory_maps()}
    return {lib for lib in HEAVY_LIBRARIES for path in paths if lib in path}


def test_a_live_suites_workers_and_scheduler_map_no_heavy_library(suite):
    with Client(home=suite.home) as client:
        tasks = client.submit_many([{"type": "echo", "payload": i} for i in range(20)])
        for task in tasks:
            assert client.wait(task["id"], timeout=60)["state"] == "completed"
        workers = wait_for(lambda: [w for w in client.call("pool", "pool.status")["workers"]
                                    if w.get("pid")], timeout=60, what="the workers")
        scheduler = client.call("scheduler", "scheduler.status")["pid"]
        pool = client.call("pool", "pool.status")["pid"]
    assert workers
    for worker in workers:
        # Forked from the pool: its child, sharing the pool's libraries (psutil among
        # them, at no cost), never started anew as `python -m ...worker`.
        process = psutil.Process(worker["pid"])
        assert process.ppid() == pool
        assert process.cmdline() == psutil.Process(pool).cmdline()
        assert mapped_libraries(worker["pid"]) - {"psutil"} == set(), worker
    # No model saved yet: nothing to predict or route with, so no scikit-learn.
    assert mapped_libraries(scheduler) & {"numpy", "scipy", "sklearn", "openblas"} == set()


def test_the_scheduler_predicts_with_numpy_alone_once_a_model_is_saved(tmp_path):
    """The lazy path still finds a saved predictor and reads it, with numpy and without
    scikit-learn (which only the training child loads); no router, no scikit-learn."""
    train = f"""
from cortex.services.scheduler.prediction.predictor import Predictor
rows = [{{"type": "echo", "priority": "medium", "description": f"d{{i}}",
         "payload_size": i, "duration": 1.0 + i % 3, "tokens": 10.0, "memory_mb": 1.0,
         "cpu_s": 0.1}} for i in range(40)]
assert Predictor({str(tmp_path)!r}, min_samples=10).train(rows).get("trained", True)
"""
    subprocess.run([sys.executable, "-c", train], timeout=300, check=True)
    code = f"""
import sys
from pathlib import Path
from cortex.services.scheduler.prediction.predictor import Predictor
from cortex.services.scheduler.process import load_router
from cortex.services.scheduler.classify_rows import RoutingError
models = Path({str(tmp_path)!r})
assert not Predictor.load(models / "none").status()["loaded"]
assert "numpy" not in sys.modules
try:
    load_router(models)
except RoutingError as e:
    assert "no routing model" in str(e)
predictor = Predictor.load(models)
assert predictor.status()["loaded"], predictor.status()["reason"]
assert predictor.predict("echo", "medium", "d3", 3).source == "model"
assert "numpy" in sys.modules
assert not {{"sklearn", "scipy", "joblib"}} & set(sys.modules), "scikit-learn loaded"
"""
    subprocess.run([sys.executable, "-c", code], timeout=300, check=True)


def test_the_probe_sees_a_module_that_is_imported():
    """The check above can fail: a module that does import numpy is caught."""
    assert "numpy" in imported_by("cortex.services.scheduler.prediction.models")
