"""What goes to a page: JSON text, the API's responses, one open page's bounded queue."""

from __future__ import annotations

import asyncio
import json

import orjson
from aiohttp import web

from cortex.services.dashboard.state import EventFilter

OUTBOX = 30  # messages queued for one page; a page further behind gets a fresh snapshot
HTTP_CODES = {"not_found": 404, "bad_request": 400, "conflict": 409, "unavailable": 503,
              "timeout": 504}


def encode(value) -> str:
    """JSON text for a page; events may hold what JSON has no word for (bytes, huge ints)."""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return json.dumps(value, default=str)


def json_response(value, status: int = 200) -> web.Response:
    return web.Response(text=encode(value), status=status, content_type="application/json")


def error_response(code: str, message: str) -> web.Response:
    return json_response({"code": code, "message": message}, HTTP_CODES.get(code, 500))


class Page:
    """One open page: its WebSocket, its filter, and a bounded queue of messages."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.filter = EventFilter()
        self.task: str | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self.behind = False  # dropped updates: it gets a whole snapshot next
        self.wake = asyncio.Event()

    def push(self, text: str) -> None:
        if self.behind:
            return
        try:
            self.outbox.put_nowait(text)
        except asyncio.QueueFull:
            self.behind = True  # a slow page never holds the others up
            while not self.outbox.empty():
                self.outbox.get_nowait()
        self.wake.set()
