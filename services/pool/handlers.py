"""Built-in task handlers, and the adapter for external commands.

A handler is a callable taking the TaskContext and returning a JSON-able result.
"""

from __future__ import annotations

import importlib
import json
import os

from cortex.protocol.worker import Cancelled, TaskContext


def echo(ctx: TaskContext):
    """Returns the payload at once: the no-op task of load tests."""
    return ctx.payload


def _pause(ctx: TaskContext, seconds: float) -> None:
    # Wait on the cancel flag rather than sleeping, so a cancel interrupts at once.
    if ctx.cancelled.wait(max(0.0, seconds)):
        raise Cancelled(f"task {ctx.id} was cancelled")


def sleep(ctx: TaskContext):
    """Sleeps payload["seconds"] (default 0.05), then returns them."""
    seconds = float((ctx.payload or {}).get("seconds", 0.05))
    _pause(ctx, seconds)
    return {"slept": seconds}


def simulated_agent(ctx: TaskContext):
    """An LLM agent stand-in: works for payload["seconds"] in a few steps, using
    payload["tokens"] in total (each step goes through the budget check), optionally
    failing when payload["fail"] is true."""
    payload = ctx.payload or {}
    seconds = float(payload.get("seconds", 0.05))
    tokens = int(payload.get("tokens", 0))
    steps = max(1, min(int(payload.get("steps", 4)), 100))
    for step in range(steps):
        _pause(ctx, seconds / steps)
        share = tokens // steps + (1 if step < tokens % steps else 0)
        if payload.get("overrun"):
            ctx.report_tokens(ctx.tokens_used + share)  # reported after the fact
        else:
            ctx.use_tokens(share)
        ctx.progress((step + 1) / steps, f"step {step + 1} of {steps}")
    if payload.get("fail"):
        raise RuntimeError("simulated failure")
    return {"tokens": ctx.tokens_used, "seconds": seconds}


def fail(ctx: TaskContext):
    """Always fails: exercises the failure path."""
    raise RuntimeError((ctx.payload or {}).get("message", "failed on purpose"))


def command(argv: list[str]):
    """A handler running `argv` (from configuration, never from a task) with the task as
    JSON on stdin; its stdout (JSON if it parses) is the result. The command stays in the
    worker's process group, so a timeout that ends the group ends it and its children;
    once it exits, what it left holding its output (a detached `cmd &`) is ended, so the
    task does not wait on them (they carry the task's tag: see worker.py)."""
    import subprocess  # here: only a worker serving a command needs it

    def run(ctx: TaskContext):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        task = json.dumps(ctx.task).encode()
        out = err = None
        try:
            out, err = proc.communicate(task, timeout=0.05)
        except subprocess.TimeoutExpired:
            while out is None:
                if ctx.cancelled.is_set():
                    _kill_tree(proc.pid)
                    proc.wait()
                    raise Cancelled(f"task {ctx.id} was cancelled") from None
                try:
                    out, err = proc.communicate(timeout=0.2)
                except subprocess.TimeoutExpired:
                    if proc.poll() is not None:  # exited, its pipes held by what it left
                        _end_left(ctx.id)
                    continue
        if proc.returncode != 0:
            raise RuntimeError(f"command exited {proc.returncode}: "
                               f"{err.decode(errors='replace')[-500:]}")
        text = out.decode(errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    return run


def _end_left(task_id: str) -> None:
    from cortex.services.runtime import lineage

    lineage.end(lineage.tagged_below(lineage.TASK_TAG, task_id, os.getppid()), grace=1.0)


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            proc.kill()
    except psutil.Error:
        pass


def resolve(spec) -> object:
    """A handler from configuration: "module:function" or {"command": [...]}."""
    if isinstance(spec, dict):
        return command(spec["command"])
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


