"""The scenarios: what the agents do, and one `Session` that runs them against a suite.

A run = one suite (started for it, or the one given with --home), a warm-up, an idle-CPU
measurement, the selected scenarios one after another, and a second idle measurement.
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time

import psutil

from . import harness, shares, viewer
from .agents import AgentPlan, Job, Options, Progress, Sync, run_agents
from .learning import (
    _training_line,
    mixed_job,
    mixed_phases,
    prediction_accuracy,
    retrain_model,
)
from .workloads import synthetic_workload

SCENARIOS = ("latency", "rate", "noop", "onetype", "utilization", "priority", "mixed", "sweep",
             "chaos", "events", "dashboard")
ONETYPE_SLEEPS = 100  # onetype: 0.1 s sleeps that teach the scheduler the type first
EVENT_PUBLISHERS = 4  # threads publishing in the events scenario
PRIORITY_FLOOD = 2000
PRIORITY_CRITICAL = 200
MODEL_WAIT_S = 120.0  # mixed: longest wait for the retrained model to be loaded


def split(jobs: list[Job], agents: int, prefix: str, mode: str = "closed", **kw
          ) -> list[AgentPlan]:
    """Deal `jobs` round robin to `agents` agents (never more agents than jobs)."""
    n = max(1, min(agents, len(jobs)))
    return [AgentPlan(f"{prefix}-{i}", jobs[i::n], mode, **kw) for i in range(n)]


def harness_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class Live(threading.Thread):
    """The progress line on stderr: tasks done, rate, current coordination P95."""

    def __init__(self, name: str, planned: int, progress: Progress, sampler, quiet: bool):
        super().__init__(name="progress", daemon=True)
        self.label, self.planned, self.progress = name, planned, progress
        self.sampler, self.quiet = sampler, quiet
        self.halt = threading.Event()
        self.tty = sys.stderr.isatty()

    def run(self) -> None:
        done, start, last_n, last_t = 0, time.monotonic(), 0, time.monotonic()
        every = 0.5 if self.tty else 5.0
        while not self.halt.wait(every):
            done = self.show(start, last_n, last_t)
            last_n, last_t = done, time.monotonic()
        self.show(start, last_n, last_t, final=True)

    def show(self, start, last_n, last_t, final=False) -> int:
        with self.progress.lock:
            done = self.progress.done
            recent = sorted(self.progress.recent)
        rate = (done - last_n) / max(time.monotonic() - last_t, 1e-6)
        if final:
            rate = done / max(time.monotonic() - start, 1e-6)
        p95 = harness.percentile(recent, 95)
        queue = None
        if self.sampler.timeline:
            queue = self.sampler.timeline[-1].get("queue")
        line = (f"[{self.label}] {done}/{self.planned} done  {rate:7.0f}/s  "
                f"coord P95 {p95 if p95 is not None else float('nan'):7.2f} ms  queue {queue}")
        if not self.quiet:
            end = "\n" if final or not self.tty else ""
            print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
        return done

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)


class Session:
    def __init__(self, args, target: harness.Target, run_index: int = 0):
        self.args = args
        self.target = target
        self.run_index = run_index
        self.seed = args.seed + run_index
        self.sampler = harness.Sampler(target, interval=args.sample_interval)
        self.client = None

    # -- plumbing ----------------------------------------------------------------------------
    def procs_for(self, agents: int) -> int:
        if self.args.procs >= 0:
            return self.args.procs
        return 1 if agents <= 20 else min(4, math.ceil(agents / 50))

    def options(self, **kw) -> Options:
        opts = Options(call_timeout=self.args.call_timeout, wait_timeout=self.args.wait_timeout,
                       deadline=self.args.duration if self.args.duration else None)
        for k, v in kw.items():
            setattr(opts, k, v)
        return opts

    def execute(self, name: str, plans: list[AgentPlan], opts: Options, processes: int,
                sync: Sync | None = None, extra=None, during=None, then=()) -> dict:
        """Run the plans with everything measured around them; returns the result.

        `then`: further phases, each ``(hook, plans)``: once the previous phase's tasks are
        final and their events written, ``hook(client)`` runs (e.g. retrain the model),
        then the plans. Every record carries its phase number (0 first) in ``"phase"``;
        the measurement spans all phases, the pauses between them included."""
        from cortex.protocol import Client

        client = self.client or Client(self.target.home, timeout=10.0,
                                       name=f"loadtest-{int(time.time() * 1000) % 10**8}")
        self.client = client
        phases = [(None, plans), *then]
        planned = sum(len(p.jobs) for _, ps in phases for p in ps)
        agents = len(plans)
        offsets = harness.event_offsets(self.target.home)
        before = harness.bus_snapshot(client)
        self.sampler.begin()
        cpu0 = harness_cpu()
        progress = Progress()
        live = Live(name, planned, progress, self.sampler, self.args.quiet)
        live.start()
        side = None
        if during is not None:
            side = during()
        t0, records = None, []
        try:
            for number, (hook, phase_plans) in enumerate(phases):
                if hook is not None:
                    harness.resolve_unfinished(client, records, grace=self.args.grace)
                    harness.settle_events(client)  # the hook may read the event log
                    hook(client)
                started, phase_records = run_agents(self.target.home, phase_plans, opts,
                                                    progress, processes=processes, sync=sync)
                for rec in phase_records:
                    rec["phase"] = number
                t0 = started if t0 is None else t0
                records.extend(phase_records)
        finally:
            if side is not None:
                side.stop()
            live.stop()
        t_end = time.time()
        if side is not None:
            self.target.suite.wait_ready(timeout=60)
        harness.resolve_unfinished(client, records, grace=self.args.grace)
        settle = harness.settle_events(client)
        self.settle_ledger(client)
        after = harness.bus_snapshot(client)
        sampled = self.sampler.end()
        extra_fields = extra(records) if callable(extra) else (extra or {})
        if side is not None:
            extra_fields["chaos"] = side.report()
        result = harness.measure(name, self.target, records, t0, t_end, before, after, offsets,
                                 sampled, agents, processes, harness_cpu() - cpu0,
                                 extra_fields, settle)
        zombies = self.target.zombies()
        if zombies:
            time.sleep(2.0)  # give the reapers a moment: only lasting zombies count
            lasting = [p for p in self.target.zombies() if p in zombies]
        else:
            lasting = []
        result["resources"]["memory_at_end"] = harness.memory(self.target)
        result["zombies"] = len(lasting)
        result["zombies_transient"] = len(zombies)
        return result

    @staticmethod
    def settle_ledger(client, timeout: float = 10.0) -> None:
        """Commits follow completions asynchronously: wait until the scheduler has no
        ledger order unanswered, nothing is reserved and the committed figure holds still."""
        from cortex.protocol import errors

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                rows = client.budget().get("budgets", [])
                orders = client.call("scheduler", "scheduler.status",
                                     timeout=5).get("ledger_orders", 0)
            except errors.CortexError:
                time.sleep(0.2)
                continue
            glob = [r for r in rows if r.get("scope") == "global"]
            key = tuple((r.get("reserved"), r.get("committed")) for r in glob)
            if key == last and not orders and all(not r.get("reserved") for r in glob):
                return
            last = key
            time.sleep(0.2)  # polling the ledger's view until it is still

    def warm_up(self) -> None:
        jobs = [Job("echo", "warm-up") for _ in range(max(40, 4 * self.target.workers))]
        run_agents(self.target.home, split(jobs, 10, "warm"), self.options(deadline=None),
                   Progress())

    # -- the scenarios -------------------------------------------------------------------------
    def latency(self) -> dict:
        n = self.args.tasks
        jobs = [Job("echo", "latency probe", payload={"i": i}) for i in range(n)]
        return self.execute("latency", [AgentPlan("latency-0", jobs)], self.options(), 1)

    def noop(self, agents: int | None = None, tasks: int | None = None, name="noop") -> dict:
        agents = agents or self.args.agents
        tasks = tasks or self.args.tasks
        jobs = [Job("echo", "noop") for _ in range(tasks)]
        return self.execute(name, split(jobs, agents, name), self.options(),
                            self.procs_for(agents))

    def dashboard(self) -> dict:
        """noop without, then with a headless page of the dashboard open (--dashboard-page,
        default the events page): what a viewer costs the suite."""
        return viewer.with_and_without(lambda: self.noop(name="dashboard"), self.target.home,
                                       self.args.dashboard_page or "events")

    def onetype(self) -> dict:
        """One handler for every task, as a new user has it: 0.1 s sleeps first (they
        teach the scheduler the type), then --tasks no-ops of the same type from --agents
        agents. Reports how many tasks waited and why (`waiting`), and the no-op phase
        on its own (`noop_phase`)."""
        agents = self.args.agents
        sleeps = [Job("sleep", "onetype", payload={"seconds": 0.1}, tag="sleep")
                  for _ in range(max(ONETYPE_SLEEPS, 5 * self.target.workers))]
        noops = [Job("sleep", "onetype", payload={"seconds": 0}, tag="noop")
                 for _ in range(self.args.tasks)]

        def extra(records):
            phase = [r for r in records if r.get("phase") == 1]
            starts = [r["t_submit"] for r in phase if r["t_submit"] is not None]
            ends = [r["t_seen"] for r in phase if r["t_seen"] is not None]
            done = sum(1 for r in phase if r["state"] == "completed")
            wall = (max(ends) - min(starts)) if starts and ends else None
            return {"noop_phase": {
                "tasks": len(phase), "completed": done,
                "throughput": round(done / wall, 2) if wall else None,
                "coordination_ms": harness.summarize(
                    (r["started"] - r["t_submit"]) * 1000 for r in phase
                    if r["started"] is not None and r["attempt"] == 1)},
                "sleeps": len(sleeps)}

        return self.execute("onetype", split(sleeps, agents, "onetype-s"), self.options(),
                            self.procs_for(agents), extra=extra,
                            then=[(lambda client: None, split(noops, agents, "onetype"))])

    def rate(self) -> dict:
        rate = self.args.rate
        n = int(rate * self.args.duration) if self.args.duration else self.args.tasks
        jobs = [Job("echo", "open loop", at=i / rate) for i in range(n)]
        agents = self.args.agents
        plans = split(jobs, agents, "rate", mode="open")

        def extra(records):
            lag = [(r["t_submit"] - r["due"]) * 1000 for r in records if r["due"] is not None]
            span = [r["t_submit"] for r in records if r["t_submit"] is not None]
            achieved = (len(span) - 1) / (max(span) - min(span)) if len(span) > 1 else None
            return {"rate": {"offered": rate, "achieved_submit_rate":
                             round(achieved, 2) if achieved else None,
                             "submit_lag_ms": harness.summarize(lag)}}

        return self.execute("rate", plans, self.options(deadline=None), self.procs_for(agents),
                            extra=extra)

    def utilization(self) -> dict:
        seconds = self.args.sleep_ms / 1000
        agents = max(self.args.agents, 2 * self.target.workers)
        jobs = [Job("sleep", "utilization", payload={"seconds": seconds})
                for _ in range(self.args.tasks)]
        return self.execute("utilization", split(jobs, agents, "util"), self.options(),
                            self.procs_for(agents),
                            extra={"sleep_ms": self.args.sleep_ms})

    def priority(self) -> dict:
        seconds = self.args.sleep_ms / 1000
        flood = [Job("sleep", "bulk low-priority work", priority="low",
                     payload={"seconds": seconds}, tag="flood") for _ in range(PRIORITY_FLOOD)]
        sync = Sync()
        flooders = split(flood, self.args.agents, "flood", mode="flood", signal="flooded")
        sync.latch("flooded", len(flooders))
        critical = [Job("sleep", "urgent", priority="critical", payload={"seconds": seconds},
                        tag="critical") for _ in range(PRIORITY_CRITICAL)]
        # 10 agents, each submitting a critical task every ~50 ms while the flood is queued.
        urgent = split(critical, 10, "critical", think=0.05, gate="flooded")

        def extra(records):
            crit = [r for r in records if r["tag"] == "critical" and r["started"] is not None]
            low = [r for r in records if r["tag"] == "flood" and r["started"] is not None]
            first = min((r["t_submit"] for r in crit), default=None)
            last = max((r["t_submit"] for r in crit), default=None)
            # Flood tasks still waiting (not yet started) when each critical was submitted.
            starts = sorted(r["started"] for r in low)
            import bisect
            behind = [len(starts) - bisect.bisect_right(starts, r["t_submit"]) for r in crit]
            return {"priority": {
                "flood": PRIORITY_FLOOD, "critical": len(critical),
                "critical_wait_ms": harness.summarize(
                    (r["started"] - r["t_submit"]) * 1000 for r in crit),
                # Where a critical task's wait goes: reaching the scheduler, waiting there
                # for a worker, and reaching the worker's handler.
                "critical_wait_parts_ms": {
                    part: harness.summarize((r[b] - r[a]) * 1000 for r in crit
                                            if r[a] is not None and r[b] is not None)
                    for part, a, b in (("to_scheduler", "t_submit", "created"),
                                       ("for_worker", "created", "dispatched"),
                                       ("to_handler", "dispatched", "started"))},
                "low_wait_ms": harness.summarize(
                    (r["started"] - r["t_submit"]) * 1000 for r in low),
                "flood_queued_at_critical_submit": harness.summarize(behind),
                "critical_window_s": round(last - first, 3) if crit else None}}

        return self.execute("priority", flooders + urgent, self.options(deadline=None), 1,
                            sync=sync, extra=extra)

    def mixed(self) -> dict:
        """Synthetic agent work in two phases: train the scheduler's model on the first
        part, then measure its predictions on the rest (see `mixed_phases`)."""
        rng = random.Random(self.seed)
        try:
            kinds = self.client_types()
        except Exception:  # noqa: BLE001 - any trouble asking: fall back to the generic type
            kinds = set()
        n_train, _ = mixed_phases(self.args.tasks)
        jobs = [mixed_job(row, rng, kinds, self.args.mixed_scale)
                for row in synthetic_workload(self.args.tasks, seed=self.seed)]
        train_jobs, measure_jobs = jobs[:n_train], jobs[n_train:]
        # The llm and auto shares, dealt into both phases at random places.
        extra_jobs = shares.jobs(self.args.tasks, rng, kinds)
        for job in extra_jobs:
            phase = train_jobs if not measure_jobs or rng.random() < 0.5 else measure_jobs
            phase.insert(rng.randrange(len(phase) + 1), job)
        router = None
        if any(j.type == "auto" for j in extra_jobs):  # trained at the suite's start
            from cortex.protocol import Client

            with Client(self.target.home, timeout=10) as client:
                router = shares.wait_for_router(client)
        offsets = harness.event_offsets(self.target.home)
        agents = self.args.agents
        training: dict = {}

        def retrain(client) -> None:
            training.update(retrain_model(client, self.target.home, MODEL_WAIT_S))
            if not self.args.quiet:
                print(f"[mixed] model: {_training_line(training)}", file=sys.stderr,
                      flush=True)

        def extra(records):
            shared = shares.report(records, self.target.home, offsets,
                                   getattr(self.args, "_openai_server", None), router)
            records = [r for r in records if r["tag"] != "llm"
                       and not r["tag"].startswith("auto:")]  # not the predictor's work
            by_type: dict[str, dict] = {}
            for r in records:
                row = by_type.setdefault(r["tag"], {"tasks": 0, "completed": 0, "e2e": []})
                row["tasks"] += 1
                if r["state"] == "completed":
                    row["completed"] += 1
                    if r["t_seen"]:
                        row["e2e"].append((r["t_seen"] - r["t_submit"]) * 1000)
            last = 1 if measure_jobs else 0
            return {"mixed": {t: {"tasks": v["tasks"], "completed": v["completed"],
                                  "end_to_end_ms": harness.summarize(v["e2e"])}
                              for t, v in sorted(by_type.items())},
                    "phases": {"training": len(train_jobs), "measurement": len(measure_jobs),
                               "scale": self.args.mixed_scale},
                    # The figure that counts: tasks submitted after the retrained model
                    # was loaded, none of which it was trained on.
                    "prediction": prediction_accuracy(
                        [r for r in records if r.get("phase", 0) == last]),
                    "prediction_training_phase": prediction_accuracy(
                        [r for r in records if r.get("phase", 0) == 0]),
                    "model_training": training or None,
                    "intended_failures": sum(1 for j in jobs if j.tag == "fail" or (
                        isinstance(j.payload, dict) and j.payload.get("fail"))), **shared}

        then = [(retrain, split(measure_jobs, agents, "mixed-m"))] if measure_jobs else []
        return self.execute("mixed", split(train_jobs, agents, "mixed"), self.options(),
                            self.procs_for(agents), extra=extra, then=then)

    def client_types(self) -> set[str]:
        from cortex.protocol import Client

        with Client(self.target.home, timeout=5) as c:
            return set(c.call("scheduler", "scheduler.status").get("workers", {}))

    def sweep(self) -> dict:
        points = []
        for agents in self.args.sweep_agents:
            tasks = max(self.args.tasks, 5 * agents)
            r = self.noop(agents=agents, tasks=tasks, name=f"sweep-{agents}")
            points.append(r)
        summary = [{"agents": p["agents"], "agent_processes": p["agent_processes"],
                    "tasks": p["tasks"]["planned"], "throughput": p["throughput"],
                    "coordination_ms": {k: p["latency_ms"]["coordination"][k]
                                        for k in ("p50", "p95", "p99", "max")},
                    "end_to_end_ms": {k: p["latency_ms"]["end_to_end"][k]
                                      for k in ("p50", "p95", "p99", "max")},
                    "submit_ms": {k: p["latency_ms"]["submit"][k]
                                  for k in ("p50", "p95", "p99", "max")},
                    "lost": p["tasks"]["lost"], "duplicated": p["tasks"]["duplicated"],
                    "zombies": p["zombies"], "cpu_s": p["resources"]["cpu_s"],
                    "harness_cpu_s": p["resources"]["harness_cpu_s"]}
                   for p in points]
        total = {k: sum(p["tasks"][k] for p in points) for k in points[0]["tasks"]}
        return {"scenario": "sweep", "points": summary, "tasks": total,
                "zombies": sum(p["zombies"] for p in points),
                "_series": {"points": points}}

    def chaos(self) -> dict:
        base = self.args.chaos_base
        target = self.target
        interval = self.args.chaos_interval
        rng = random.Random(self.seed)

        class Killer(threading.Thread):
            def __init__(self):
                super().__init__(name="chaos", daemon=True)
                self.halt = threading.Event()
                self.kills: list[dict] = []

            def run(self):
                while not self.halt.wait(rng.uniform(0.5 * interval, 1.5 * interval)):
                    if rng.random() < 0.5:
                        pool = [(p, r) for p, r in target.services().items()
                                if r != "supervisord"]
                    else:
                        pool = [(p, "worker") for p in target.worker_pids()]
                    if not pool:
                        continue
                    pid, role = rng.choice(pool)
                    if target.kill(pid):
                        self.kills.append({"t": time.time(), "pid": pid, "role": role})

            def stop(self):
                self.halt.set()
                self.join(timeout=5)

            def report(self):
                by_role: dict[str, int] = {}
                for k in self.kills:
                    by_role[k["role"]] = by_role.get(k["role"], 0) + 1
                return {"kills": len(self.kills), "by_role": by_role, "base": base,
                        "interval_s": interval}

        n = self.args.tasks
        if base == "mixed":
            jobs = [Job("simulated_agent", "chaos", tokens=120,
                        payload={"seconds": 0.02, "tokens": 100, "steps": 2})
                    for _ in range(n)]
        elif base == "utilization":
            jobs = [Job("sleep", "chaos", payload={"seconds": self.args.sleep_ms / 1000})
                    for _ in range(n)]
        else:
            jobs = [Job("echo", "chaos") for _ in range(n)]
        agents = self.args.agents
        opts = self.options(wait_timeout=max(self.args.wait_timeout, 180.0), submit_attempts=10)
        return self.execute("chaos", split(jobs, agents, "chaos"), opts, self.procs_for(agents),
                            during=lambda: _started(Killer()))

    # -- a whole run ---------------------------------------------------------------------------
    def events(self) -> dict:
        """Events straight into the router through the same acknowledged channel the
        services use: sustained events/s until every one is acknowledged (written to
        JSONL), then loss and duplicates counted in the JSONL, and PostgreSQL lag (when the
        suite copies events there) sampled until it drains."""
        import glob

        import orjson
        import zmq

        from cortex.protocol import locate
        from cortex.protocol.publisher import EventPublisher

        total = max(self.args.tasks * 20, EVENT_PUBLISHERS)
        per = total // EVENT_PUBLISHERS
        endpoint = locate.endpoints(self.target.home)["events_in"]
        # A privileged probe: the fan-in takes only the suite's own publishers, and the
        # load test runs as the suite's owner.
        secret = locate.secret_path(self.target.home).read_text().strip()
        ctx = zmq.Context.instance()
        tag = f"lt{int(time.time() * 1000) % 10**9}"
        pg_lag: list[int] = []
        done = threading.Barrier(EVENT_PUBLISHERS + 1)

        def publish(n: int) -> None:
            pub = EventPublisher(ctx, endpoint, f"{tag}-{n}", time.time_ns(), secret=secret)
            try:
                for i in range(per):
                    pub.emit("loadtest.event", {"i": i, "text": "x" * 64}, task=f"{tag}-{n}-{i}")
                    if i % 200 == 199:
                        pub.flush()
                        pub.on_message()
                pub.flush()
                deadline = time.monotonic() + 120
                while pub.unacked and time.monotonic() < deadline:
                    if pub.socket.poll(50):
                        pub.on_message()
                    pub.tick(time.monotonic())
            finally:
                done.wait()
                pub.close()

        cpu0 = harness_cpu()
        started = time.monotonic()
        threads = [_started(threading.Thread(target=publish, args=(n,)))
                   for n in range(EVENT_PUBLISHERS)]
        done.wait()
        elapsed = time.monotonic() - started
        for t in threads:
            t.join()
        postgres = None
        if self.client is None:
            from cortex.protocol import Client

            self.client = Client(self.target.home, timeout=10.0)
        settle_deadline = time.monotonic() + 120
        while True:  # PostgreSQL lag, until it drains (JSONL is already complete)
            try:
                status = self.client.call("events", "events.status", timeout=5)
            except Exception:
                status = None
            postgres = (status or {}).get("postgres")
            if not postgres:
                break
            pg_lag.append(postgres.get("lag", 0))
            if postgres.get("lag", 0) == 0 or time.monotonic() > settle_deadline:
                break
            time.sleep(0.25)  # sampling an outside service's lag, with a deadline
        pg_settle = time.monotonic() - started - elapsed
        ids: dict[str, int] = {}
        for path in glob.glob(str(self.target.home / "events" / "*.jsonl")):
            with open(path, "rb") as f:
                for line in f:
                    if tag.encode() in line:
                        try:
                            ev = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            continue
                        ids[ev["id"]] = ids.get(ev["id"], 0) + 1
        written = len(ids)
        return {"agents": EVENT_PUBLISHERS, "workers": None, "wall_s": elapsed,
                "throughput": total / elapsed, "completion_rate": written / total,
                "tasks": {"planned": total, "lost": total - written,
                          "duplicated": sum(1 for n in ids.values() if n > 1)},
                "zombies": 0, "latency_ms": {},
                "events": {"emitted": total, "written": written, "jsonl_lines": sum(ids.values()),
                           "missing": total - written,
                           "duplicates": sum(n - 1 for n in ids.values()),
                           "per_s": total / elapsed,
                           "postgres": None if postgres is None else {
                               "lag_max": max(pg_lag or [0]), "lag_end": pg_lag[-1] if pg_lag
                               else None, "settle_s": pg_settle, "stats": postgres}},
                "resources": {"harness_cpu_s": harness_cpu() - cpu0}}

    def run(self, names: list[str]) -> dict:
        self.sampler.start()
        try:
            self.warm_up()
            idle_before = harness.idle_cpu(self.target, self.args.idle_seconds)
            results = {}
            for name in names:
                results[name] = getattr(self, name)()
            time.sleep(1.0)  # let the last acknowledgements and snapshots go out
            idle_after = harness.idle_cpu(self.target, self.args.idle_seconds,
                                          client=self.client)
        finally:
            self.sampler.stop()
            if self.client is not None:
                self.client.close()
                self.client = None
        return {"scenarios": results, "idle_cpu": {"before": idle_before, "after": idle_after},
                "suite_start_s": self.target.start_s}


def _started(thread):
    thread.start()
    return thread
