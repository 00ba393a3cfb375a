"""The training child of the scheduler process: models are fitted in a child process
(fitting in a thread of ours held the GIL for a third of the loop's time under load).

`python -m cortex.services.scheduler.prediction train` reads the event log's history and
prints one line before it fits (`{"rows": N, "min_samples": M}`), then its report, and
exits 0 when it saved new models. `model.train` is answered at that first line: started,
or why not (fewer rows than the minimum); or at once when a training already runs; or,
if the child dies first, with its error output; or, if the child has not said by
ANSWER_WITHIN, as started (a client's call must not time out: the last failure is then
in `model.status`). The new models are read in a thread (a stall of every dispatch
otherwise) and swapped in. The last failure's reason is kept for `model.status`.

An automatic training (not asked for) waits for a lull: the child's import and fit take
CPU and ~100 MB while it lives, which a saturated suite pays in throughput. It starts
once no task has been queued for workers, nor submitted, for LULL_SECONDS (a moment's
empty queue between two bursts is no lull, nor is a steady load whose tasks each find a
free worker), or once it has waited MAX_LULL_WAIT (a suite that is
never idle still retrains); see `lull_allows`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from cortex.services.runtime.effects import Effects
from cortex.services.runtime.lineage import arm_in_child

MIN_TRAINING_GAP = 60.0  # seconds between automatic retrains
ANSWER_WITHIN = 5.0  # seconds a model.train waits for the child's first line
ANSWERS_KEPT = 16  # model.train answers kept for re-sent copies of the request
REPORT_CHARS = 2000
MAX_LULL_WAIT = 300.0  # seconds an automatic training waits for no task to be queued
LULL_SECONDS = 5.0  # nothing queued this long is a lull


def lull_allows(due_since: float, quiet_since: float | None, now: float,
                max_wait: float = MAX_LULL_WAIT, lull: float = LULL_SECONDS) -> bool:
    """May an automatic training that is due since `due_since` start `now`? Yes when no
    task has been queued for workers since `quiet_since` for `lull` seconds, or when it
    has waited `max_wait` seconds."""
    quiet = quiet_since is not None and now - quiet_since >= lull
    return quiet or now - due_since >= max_wait


def _nice_child(parent: int) -> None:  # in the training child, before exec
    os.nice(10)  # the services come first
    try:  # and better still: train only on CPU time nothing else wants (Linux)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    arm_in_child(parent)  # dies with us (Linux); the child watches us itself elsewhere


class Trainer:
    def __init__(self, home: Path, predictor, command: list[str] | None = None,
                 answer_within: float = ANSWER_WITHIN, events: str = "model"):
        self.predictor = predictor  # or the router (routing.RouterModel): the same face
        self.events = events  # its events: `<events>.trained`, `<events>.training_failed`
        self.answer_within = answer_within
        self.command = command or [sys.executable, "-m", "cortex.services.scheduler.prediction",
                                   "train", "--home", str(home)]
        self.child: subprocess.Popen | None = None
        self.started_at = 0.0  # monotonic
        self._out = b""  # the child's stdout so far
        self._err = None  # its stderr (a temp file: a pipe nobody reads could fill up)
        self._first_line: dict | None = None
        self._asking: list[tuple[bytes, bytes]] = []  # model.train requests not yet answered
        self._answers: OrderedDict[tuple[bytes, bytes], dict] = OrderedDict()
        self.loader: tuple[threading.Thread, list, str] | None = None  # models being read
        self.next_auto = 0.0  # monotonic: no automatic retrain before
        self.quiet_since: float | None = None  # no task queued for workers since
        self.due_since: float | None = None  # an automatic retrain waits for a lull since
        self.last_failure: dict | None = None  # {at, exit_code, reason}

    @property
    def busy(self) -> bool:
        return self.child is not None or self.loader is not None

    def status(self) -> dict:
        return {"training": self.busy, "last_failure": self.last_failure,
                "waiting_for_lull": self.due_since is not None}

    def request(self, fx: Effects, peer: bytes, corr: bytes, now: float) -> None:
        """`model.train`: start a training and answer when the child says if it fits."""
        who = (peer, corr)
        if who in self._answers:  # a re-sent copy: the same answer
            fx.reply(peer, corr, self._answers[who])
            return
        if who in self._asking:
            return  # answered with the first
        if self.busy:
            since = round(now - self.started_at, 1)
            what = "reading the new models" if self.child is None else (
                f"a training is already running (pid {self.child.pid}, for {since} s)")
            self._answer(fx, who, False, what)
            return
        self._asking.append(who)
        self.start(now)

    def maybe_auto(self, every: int, now: float, queued: bool = False) -> None:
        """Retrain every `every` completions, at most every MIN_TRAINING_GAP, in a lull."""
        self.saw_queue(now, queued)
        outdated = getattr(self.predictor, "outdated", False)  # an older format on disk
        if every and (self.predictor.completions_since_training() >= every or outdated):
            self.start_in_lull(now, queued)

    def saw_queue(self, now: float, queued: bool) -> None:
        """What the queue looked like now (asked on every tick)."""
        if queued:
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = now

    def start_in_lull(self, now: float, queued: bool) -> bool:
        """Start an automatic training that is due, if the lull rule lets it start now."""
        self.saw_queue(now, queued)
        if self.busy or now < self.next_auto:
            return False
        if self.due_since is None:
            self.due_since = now
        if not lull_allows(self.due_since, self.quiet_since, now):
            return False
        self.start(now)
        return True

    def start(self, now: float) -> None:
        self.due_since = None
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the child is done
        self._out, self._first_line = b"", None
        self.child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._err,
                                      preexec_fn=functools.partial(_nice_child, os.getpid()))
        os.set_blocking(self.child.stdout.fileno(), False)
        self.started_at = now
        self.next_auto = now + MIN_TRAINING_GAP

    def poll(self, fx: Effects, now: float) -> None:
        """Read the child's output, answer waiting requests, take in new models."""
        if self.loader is not None:
            self._check_loader(fx)
            return
        if self.child is None:
            return
        self._read()
        if self._first_line is None and b"\n" in self._out:
            line = self._out.split(b"\n", 1)[0]
            try:
                self._first_line = json.loads(line)
            except ValueError:
                self._first_line = {}
            rows, least = self._first_line.get("rows"), self._first_line.get("min_samples")
            if isinstance(rows, int) and isinstance(least, int) and rows < least:
                self._answer_all(fx, False, f"{rows} valid rows < min_samples {least}")
            else:
                self._answer_all(fx, True, None, rows=rows)
        if self.child.poll() is None:
            if self._asking and now - self.started_at >= self.answer_within:
                self._answer_all(fx, True, None, rows=None)  # still reading its history
            return
        self._read()
        self.child.stdout.close()
        code, self.child = self.child.returncode, None
        report = self._out.decode(errors="replace").strip()[-REPORT_CHARS:]
        self._err.seek(0)
        errors = self._err.read().decode(errors="replace").strip()[-REPORT_CHARS:]
        self._err.close()
        if code != 0:
            reason = self._report_reason(report) or errors or f"exit code {code}"
            self.last_failure = {"at": time.time(), "exit_code": code, "reason": reason}
            self._answer_all(fx, False, reason)
            fx.emit(f"{self.events}.training_failed", {"exit_code": code, "report": report,
                                                       "errors": errors})
            return
        self._answer_all(fx, True, None)  # (it printed no first line: it fitted anyway)
        read: list = []  # filled by the thread with the new predictor
        thread = threading.Thread(target=lambda: read.append(self.predictor.read_saved()),
                                  name="model-reader", daemon=True)
        self.loader = (thread, read, report)
        thread.start()

    def stop(self) -> None:
        if self.child is not None:  # never leave the training child behind
            self.child.kill()
            self.child.wait()
            self.child.stdout.close()
            self._err.close()
            self.child = None

    def _check_loader(self, fx: Effects) -> None:
        thread, read, report = self.loader
        if thread.is_alive():
            return
        self.loader = None
        loaded = bool(read) and self.predictor.adopt(read[0])  # empty: reading failed
        if not loaded:
            self.last_failure = {"at": time.time(), "exit_code": 0,
                                 "reason": self.predictor.status().get("last_error")
                                 or "the saved models could not be read"}
        fx.emit(f"{self.events}.trained" if loaded else f"{self.events}.training_failed",
                {"exit_code": 0, "report": report})

    def _read(self) -> None:
        try:  # non-blocking: None (or BlockingIOError) when nothing more for now
            while chunk := self.child.stdout.read(65536):
                self._out += chunk
        except BlockingIOError:
            pass

    @staticmethod
    def _report_reason(report: str) -> str | None:
        """The `reason` of the child's final report line, if it printed one."""
        for line in reversed(report.splitlines()):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("reason"), str):
                return data["reason"]
        return None

    def _answer_all(self, fx: Effects, started: bool, reason: str | None, **extra) -> None:
        for who in self._asking:
            self._answer(fx, who, started, reason, **extra)
        self._asking = []

    def _answer(self, fx: Effects, who: tuple[bytes, bytes], started: bool,
                reason: str | None, **extra) -> None:
        body = {**self.predictor.status(), **self.status(), "started": started,
                "reason": reason, **extra}
        self._answers[who] = body
        while len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        fx.reply(who[0], who[1], body)
