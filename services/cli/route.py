"""Routing by description: `cortex route "description"` explains the choice the scheduler
would make for a task of type `auto`; the routing lines of `cortex task show` and the
routing section of `cortex model status` are drawn here too."""

from __future__ import annotations

from .reach import connect
from .registry import JSON, Exit, arg, command
from .render import emit, emit_json, escape, number, percent, short, table


@command("route", arg("description", metavar="DESCRIPTION"),
         arg("--words", type=int, default=5, help="words shown per type (1-20, default 5)"),
         JSON)
def cmd_route(args):
    """Explain how a description would be routed: the top 3 task types with their
    probabilities, the words that weighed most for each, and what `--type auto` would do."""
    with connect(args) as client:
        reply = client.call("scheduler", "route.explain",
                            {"description": args.description, "words": args.words})
    if args.json:
        emit_json(reply)
    else:
        emit(render_route(reply))
    return Exit.OK


def verdict(reply: dict) -> str:
    """What a submit with type `auto` would get, under the scheduler's settings."""
    bar, fallback = reply.get("min_confidence", 0), reply.get("fallback") or ""
    if reply.get("confidence", 0) >= bar:
        return f"routed to {escape(reply.get('type'))}"
    if fallback:
        return f"below {bar:.2f}: goes to the fallback {escape(fallback)}"
    return f"below {bar:.2f}: refused with these candidates (no fallback set)"


def render_route(reply: dict) -> str:
    rows = []
    for rank, row in enumerate(reply.get("types", []), 1):
        words = ", ".join(f"{escape(w['word'])} (+{w['weight']:.2f})"
                          for w in row.get("words", [])) or "-"
        rows.append([str(rank), escape(row.get("type")), percent(row.get("probability")),
                     words])
    return "\n".join([table(["#", "TYPE", "PROBABILITY", "WORDS THAT WEIGHED MOST"], rows),
                      f"auto: {verdict(reply)}"])


def routing_line(routing: dict) -> str:
    """One line for `cortex task show`: how a task submitted as `auto` got its type."""
    runner = routing.get("runner_up")
    text = (f"{escape(routing.get('outcome'))}: {escape(routing.get('chosen'))} at "
            f"{percent(routing.get('confidence'))}")
    if runner:
        text += f", runner-up {escape(runner)} at {percent(routing.get('runner_up_confidence'))}"
    if routing.get("outcome") == "fallback":
        text += f"; ran as {escape(routing.get('type'))}"
    return text


def render_routing(routing: dict | None) -> str:
    """The routing section of `cortex model status`."""
    if not routing:
        return "routing: -"
    decisions = routing.get("decisions") or {}
    tail = (f"auto tasks: {number(decisions.get('routed'))} routed, "
            f"{number(decisions.get('fallback'))} to the fallback, "
            f"{number(decisions.get('refused'))} refused; min confidence "
            f"{routing.get('min_confidence')}, fallback {escape(routing.get('fallback') or '-')}"
            f"; typed tasks since training {number(routing.get('typed_since_training'))}")
    if not routing.get("trained"):
        reason = routing.get("last_error") or "none trained yet"
        return f"routing: no router ({short(reason, 200)})\n{tail}"
    held = routing.get("held_out") or {}
    labels = (held.get("confusion") or {}).get("labels") or []
    matrix = (held.get("confusion") or {}).get("matrix") or []
    out = [f"routing: {percent(held.get('accuracy'))} right on {number(held.get('rows'))} "
           f"held-out descriptions ({number(routing.get('rows'))} rows, "
           f"{len(labels)} types)", tail]
    if labels and matrix:
        # Rows: the true type; columns: the type chosen (numbered as the rows).
        out.append(table(["TRUE \\ CHOSEN", *[str(i + 1) for i in range(len(labels))]],
                         [[f"{i + 1} {escape(t)}", *[str(n) for n in row]]
                          for i, (t, row) in enumerate(zip(labels, matrix, strict=False))]))
    return "\n".join(out)
