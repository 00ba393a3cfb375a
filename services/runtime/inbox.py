"""A service's inbox: the messages read from the bus and not yet handled.

A turn reads what waits on the bus into the inbox first (and, with lanes, looks again as
it goes), then handles it lane by lane:
the service ranks each message as it is read (the scheduler: critical submits first,
then its workers' reports, which free workers, then the rest), each lane in arrival
order. A peer's messages keep their order: a message never goes to a lane handled
before one that holds an earlier message of its peer, so a client's critical submit
never overtakes its own cancel. Bounded in messages and bytes; what is not read waits
in the socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from cortex.protocol.wire import Message

MAX_MESSAGES = 2000
MAX_BYTES = 8 * 2**20


class Inbox:
    def __init__(self, rank: Callable[[Message], int], lanes: int = 1,
                 max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_BYTES):
        self.rank = rank  # 0 (first) .. lanes - 1
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.lanes: list[deque[Message]] = [deque() for _ in range(max(1, lanes))]
        self.waiting: list[dict[bytes, int]] = [{} for _ in self.lanes]  # peer -> messages
        self.count = self.bytes = 0

    def __len__(self) -> int:
        return self.count

    def full(self) -> bool:
        return self.count >= self.max_messages or self.bytes >= self.max_bytes

    def put(self, msg: Message) -> None:
        last = len(self.lanes) - 1
        lane = min(max(0, self.rank(msg)), last) if last else 0
        for later in range(last, lane, -1):  # its peer's earlier messages come first
            if msg.peer in self.waiting[later]:
                lane = later
                break
        self.lanes[lane].append(msg)
        waiting = self.waiting[lane]
        waiting[msg.peer] = waiting.get(msg.peer, 0) + 1
        self.count += 1
        self.bytes += len(msg.body)

    def take(self) -> Message:
        for lane, queue in enumerate(self.lanes):
            if queue:
                msg = queue.popleft()
                waiting = self.waiting[lane]
                if waiting[msg.peer] > 1:
                    waiting[msg.peer] -= 1
                else:
                    del waiting[msg.peer]
                self.count -= 1
                self.bytes -= len(msg.body)
                return msg
        raise IndexError("the inbox is empty")
