"""The outbox of one websocket connection: what the server has to say, waiting for a slow client.

Two parts:
- a FIFO of messages that are never dropped (accepted, progress, image, done, errors ...), bounded
  by count and by bytes. Past either bound the client is hopelessly behind: the outbox is
  *overflowed*, takes nothing more, and :meth:`Outbox.flush` returns ``"overflow"`` so the session
  closes the connection (the jobs go on; ``subscribe`` re-attaches);
- one preview slot where a newer preview replaces an unsent one (latest wins), so a slow client
  costs at most one preview of memory however fast the worker runs.

Everything here runs on the connection's event loop (engine listeners only reach it through
``loop.call_soon_threadsafe``), so there are no locks. The outbox numbers the messages it sends
(``seq`` 1, 2, 3 ... per connection) at the moment they are sent.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio

from engine.core.events import Preview

#: Rough size of one JSON message without a binary frame, for the byte bound: the bound is about
#: memory held for a stuck client, and image frames (megabytes) dominate it, not the JSON.
MESSAGE_OVERHEAD_BYTES = 256

SendMessage = Callable[[dict[str, Any], bytes | None], Awaitable[None]]
SendPreview = Callable[[Preview], Awaitable[None]]


class Outbox:
    """A bounded FIFO of never-dropped messages plus a latest-wins preview slot."""

    def __init__(self, *, max_messages: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._clock = clock
        self._fifo: collections.deque[tuple[dict[str, Any], bytes | None]] = collections.deque()
        self._fifo_bytes = 0
        self._preview: Preview | None = None
        self._overflowed = False
        self._closing = False
        self._sending = False
        self._sent = 0
        self._last_preview_at = float("-inf")
        self._wake = asyncio.Event()
        #: Previews replaced in the slot before they were sent (a metric; the newest one always wins).
        self.previews_dropped = 0

    # -- filling (any code on the loop) --------------------------------------------------------------

    def push(self, message: dict[str, Any], binary: bytes | None = None) -> bool:
        """Queue ``message`` (and the binary frame that must follow it). False when it did not fit:
        the outbox is overflowed from then on and takes nothing more."""
        if self._overflowed:
            return False
        size = MESSAGE_OVERHEAD_BYTES + (len(binary) if binary else 0)
        fits = len(self._fifo) < self.max_messages and self._fifo_bytes + size <= self.max_bytes
        if fits:
            self._fifo.append((message, binary))
            self._fifo_bytes += size
        else:
            self._overflowed = True
        self._notify()
        return fits

    def offer_preview(self, preview: Preview) -> None:
        """Put ``preview`` in the slot, replacing an unsent one (counted in ``previews_dropped``)."""
        if self._preview is not None:
            self.previews_dropped += 1
        self._preview = preview
        self._notify()

    def discard_previews(self, job_id: str | None = None) -> None:
        """Forget the unsent preview (only if it is ``job_id``'s, when given): previews are off, or
        the job ended and its last preview is stale."""
        if self._preview is not None and (job_id is None or self._preview.job_id == job_id):
            self._preview = None

    def close_when_empty(self) -> None:
        """Let :meth:`flush` send what is queued, then return ``"drained"``."""
        self._closing = True
        self._notify()

    # -- state -----------------------------------------------------------------------------------------

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    @property
    def pending_messages(self) -> int:
        """Never-dropped messages waiting to be sent (not counting the one being written)."""
        return len(self._fifo)

    @property
    def pending_bytes(self) -> int:
        """The byte-bound accounting of the waiting messages (their frames plus a fixed overhead)."""
        return self._fifo_bytes

    @property
    def has_pending_output(self) -> bool:
        """True while never-dropped messages wait or one is being written."""
        return bool(self._fifo) or self._sending

    @property
    def latest_preview(self) -> Preview | None:
        """The preview waiting in the slot, if any."""
        return self._preview

    @property
    def sent_messages(self) -> int:
        """Messages handed to ``send`` so far (= the last ``seq`` given)."""
        return self._sent

    # -- flushing (the connection's one writer task) --------------------------------------------------

    def _notify(self) -> None:
        self._wake.set()

    async def flush(self, send: SendMessage, send_preview: SendPreview,
                    preview_interval_s: Callable[[], float | None]) -> Literal["overflow", "drained"]:
        """Send until the outbox overflows or :meth:`close_when_empty` was called and it is empty.

        Messages go first, in order, each stamped with the next ``seq``. The slot's preview goes
        when no message waits and at least ``preview_interval_s()`` has passed since the last one
        (None: previews are off; the slot is left as it is). Exceptions from ``send`` (a timeout,
        a closed socket) propagate to the caller, who closes the connection."""
        while True:
            self._wake.clear()  # only what happens after this check wakes the wait below
            if self._overflowed:
                return "overflow"
            if self._fifo:
                message, binary = self._fifo.popleft()
                self._fifo_bytes -= MESSAGE_OVERHEAD_BYTES + (len(binary) if binary else 0)
                self._sent += 1
                message["seq"] = self._sent
                self._sending = True
                try:
                    await send(message, binary)
                finally:
                    self._sending = False
                continue
            if self._closing:
                return "drained"
            timeout_s: float | None = None
            interval_s = preview_interval_s()
            if self._preview is not None and interval_s is not None:
                wait_s = self._last_preview_at + interval_s - self._clock()
                if wait_s <= 0:
                    preview, self._preview = self._preview, None
                    await send_preview(preview)
                    self._last_preview_at = self._clock()
                    continue
                timeout_s = wait_s
            with anyio.move_on_after(timeout_s):
                await self._wake.wait()
