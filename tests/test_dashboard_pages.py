"""The task page's trace follows events.query's pages (pure: a stand-in for the router)."""

import asyncio

from cortex.services.dashboard.paging import all_pages


def router(events: list[dict], per_page: int):
    """Answers events.query like the router: at most `per_page` a page, a cursor, more."""
    asked = []

    async def query(body: dict) -> dict:
        asked.append(body)
        start = 0 if "after" not in body else int(body["after"]) + 1
        page = events[start:start + min(per_page, body["limit"])]
        end = start + len(page)
        return {"events": page, "more": end < len(events),
                "cursor": str(end - 1) if page else body.get("after"), "source": "jsonl"}
    return query, asked


def test_every_page_is_joined_in_order_without_doubles():
    events = [{"id": f"e{i}", "type": "task.progress"} for i in range(23)]
    query, asked = router(events, per_page=5)
    trace = asyncio.run(all_pages(query, {"task": "t1"}, most=100))
    assert trace["events"] == events and trace["more"] is False
    assert len(asked) == 5 and all(b["task"] == "t1" for b in asked)


def test_the_join_stops_at_most_and_says_more():
    events = [{"id": f"e{i}"} for i in range(40)]
    query, asked = router(events, per_page=7)
    trace = asyncio.run(all_pages(query, {"task": "t1"}, most=10))
    assert trace["events"] == events[:10] and trace["more"] is True
    assert [b["limit"] for b in asked] == [10, 3]


def test_one_page_is_one_question():
    query, asked = router([{"id": "e0"}], per_page=5)
    assert asyncio.run(all_pages(query, {"task": "t1"}, most=5))["events"] == [{"id": "e0"}]
    assert len(asked) == 1
