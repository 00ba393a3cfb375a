"""The event router's answers joined across pages (pure: `ask` is any coroutine that
answers as the router does)."""

from __future__ import annotations


async def all_pages(query, body: dict, most: int) -> dict:
    """events.query's pages joined, up to `most` events: a page holds what fits one
    message, and one task's events (its results) can pass that."""
    trace = await query({**body, "limit": most})
    while trace.get("more") and len(trace["events"]) < most:
        page = await query({**body, "after": trace["cursor"],
                            "limit": most - len(trace["events"])})
        trace = {**page, "events": trace["events"] + page["events"]}
    return trace


async def recent_events(ask, most: int) -> list[dict]:
    """events.recent's pages joined: the router's newest `most` events (fewer if its ring
    holds fewer), oldest first. A page holds what fits one message."""
    events: list[dict] = []
    body: dict = {"n": most}
    while len(events) < most:
        page = await ask(body)
        events[:0] = page["events"]
        if not page.get("more") or not page["events"]:
            break
        body = {"n": most - len(events), "before": page["before"]}
    return events
