"""The journal's fdatasync off the service's loop (fsync = "group").

A turn's replies are acknowledgements: each waits until the journal records of its turn
are durable. Synced in the loop, that wait (0.3-1 ms on an idle disk, tens of ms on a
busy one) stopped everything else: no message read, no worker given a task. Here a
thread of its own syncs while more work waits (an idle loop syncs in place: a hand-off
only adds wake-ups), once for all that was written before the sync began, and the loop
goes on; it sends each held reply once a sync asked for after its records were
written has ended, and never before. What goes to a peer that has a reply held waits
behind that reply (a task.recall never overtakes the reply that carried the task), so
each peer receives in the order the loop sent. A failed sync leaves every held reply
unsent: the loop exits and clients re-send to its successor.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

# A sync this long is a stall (a loaded or failing disk: a sync takes milliseconds). The
# replies it holds back leave late, and their peers' silence meanwhile is ours, not
# theirs (the loop's `orders_left`).
STALL = 1.0


class Syncer:
    """Syncs a file descriptor in a thread when asked; `wake_fd` becomes readable after
    each sync (poll it with the loop's sockets). Generations number the asks: a sync
    covers every ask made before it began."""

    def __init__(self, name: str):
        self._cond = threading.Condition()
        self._asked = 0
        self._synced = 0
        self._fd: int | None = None
        self._closing = False
        self.error: OSError | None = None
        self.began: float | None = None  # monotonic start of the sync under way
        self.stall_ended = 0.0  # when the last sync that took over STALL ended
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=f"{name}-sync", daemon=True)
        self._thread.start()

    @property
    def synced(self) -> int:
        return self._synced

    @property
    def in_flight(self) -> int:
        """The newest generation asked for and not yet synced, or 0."""
        return self._asked if self._asked > self._synced else 0

    def ask(self, fd: int) -> int:
        """Sync `fd` (everything written to it so far); returns the generation to wait for."""
        with self._cond:
            self._asked += 1
            self._fd = fd
            self._cond.notify()
            return self._asked

    def drain(self) -> None:
        """Wait until every ask is synced (before the file is rotated or closed, so the
        thread never syncs a closed descriptor). Raises the sync's error if one failed."""
        with self._cond:
            while self._synced < self._asked and self.error is None:
                self._cond.wait()
        if self.error is not None:
            raise self.error

    def clear_wake(self) -> None:
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)
        os.close(self.wake_fd)
        os.close(self._wake_w)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._asked == self._synced and not self._closing:
                    self._cond.wait()
                if self._asked == self._synced:
                    return  # closing, nothing left to sync
                target, fd = self._asked, self._fd
                self.began = time.monotonic()
            try:
                os.fdatasync(fd)
            except OSError as e:
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                self._wake()
                return
            with self._cond:
                self._synced = target
                ended = time.monotonic()
                if ended - self.began > STALL:
                    self.stall_ended = ended
                self.began = None
                self._cond.notify_all()
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake is waiting already


class HeldSends:
    """Sends waiting for a sync generation, in the order the loop made them. A send to a
    peer with anything held joins the queue behind it, whatever its kind."""

    def __init__(self):
        self._queue: deque[tuple[int, tuple]] = deque()  # (generation, send)
        self._peers: dict[bytes, int] = {}  # peer -> sends held for it

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def holds(self, peer: bytes) -> bool:
        return peer in self._peers

    @property
    def last_generation(self) -> int:
        return self._queue[-1][0] if self._queue else 0

    def hold(self, generation: int, send: tuple) -> None:
        self._queue.append((generation, send))
        peer = send[0]
        self._peers[peer] = self._peers.get(peer, 0) + 1

    def release(self, synced: int) -> list[tuple]:
        """The sends whose generation is synced, in order (a later one never passes an
        earlier one still waiting)."""
        out = []
        queue, peers = self._queue, self._peers
        while queue and queue[0][0] <= synced:
            send = queue.popleft()[1]
            out.append(send)
            peer = send[0]
            if peers[peer] > 1:
                peers[peer] -= 1
            else:
                del peers[peer]
        return out
