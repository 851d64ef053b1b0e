"""The state one app shares between its connections and HTTP routes, in one explicit object."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.core.history import JobHistory
from engine.core.runtime import Runtime
from hooocus_ws.auth import AuthGate
from hooocus_ws.metrics import Metrics
from hooocus_ws.previews import PreviewEncoder
from hooocus_ws.protocol import PreviewSettings
from hooocus_ws.signing import UrlSigner


@dataclass(frozen=True)
class ServerLimits:
    """Every bound of the front door in one place (house style: every queue bounded, every await timed)."""

    #: App-level cap on one client text frame; uvicorn's ws_max_size is set to the same value.
    max_message_bytes: int = 64 * 1024
    #: Token bucket per connection: sustained client messages per second and burst size.
    messages_per_s: float = 20.0
    message_burst: int = 40
    #: Close 1008 after this many invalid / rate-limited messages in a row.
    max_consecutive_errors: int = 16
    #: Per-connection outbox (never-dropped messages). Over it the client is too slow: close 1008.
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 256 * 1024 * 1024
    #: One websocket send may take this long before the client counts as stuck (close 1008).
    send_timeout_s: float = 60.0
    close_timeout_s: float = 5.0
    #: Finished jobs can be re-attached / looked up for this long; also the idempotency window.
    event_retention_s: float = 600.0
    image_url_ttl_s: float = 3600.0
    #: POST /v1/generate waits at most this long, then answers 202 with the job id.
    http_wait_timeout_s: float = 600.0
    max_http_body_bytes: int = 256 * 1024
    #: Open websockets per principal: each one holds an outbox (16 stalled sockets following one
    #: job held 155 MB until the ping timeout dropped them).
    max_ws_per_principal: int = 8


class IdempotencyCache:
    """(principal, request_id) -> (job_id, params fingerprint) for ``ttl_s``; bounded, oldest out first.
    The fingerprint lets a reuse of the key with different parameters be refused (``conflict``)
    instead of silently answering with the first job.

    Thread-safe: the doors submit on worker threads (decoding input images off the event loop),
    so ``get``/``put`` take the cache's lock, and :attr:`claim` is held by the submitter across
    get → submit → put so two retries of one key cannot both queue a job."""

    def __init__(self, *, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._items: collections.OrderedDict[tuple[str, str], tuple[str, str, float]] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: Held across one keyed submit (check, submit, record); never taken inside ``_lock``.
        self.claim = threading.Lock()

    def get(self, owner: str, request_id: str) -> tuple[str, str] | None:
        """(job_id, fingerprint) of the first use of the key, or None."""
        now = self._clock()
        with self._lock:
            while self._items:  # expire from the oldest end
                key, (_, _, expires) = next(iter(self._items.items()))
                if expires > now:
                    break
                del self._items[key]
            hit = self._items.get((owner, request_id))
        return (hit[0], hit[1]) if hit is not None else None

    def put(self, owner: str, request_id: str, job_id: str, fingerprint: str = "") -> None:
        with self._lock:
            self._items[(owner, request_id)] = (job_id, fingerprint, self._clock() + self.ttl_s)
            self._items.move_to_end((owner, request_id))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)


@dataclass
class ServerContext:
    runtime: Runtime
    gate: AuthGate
    limits: ServerLimits
    signer: UrlSigner
    default_preview: PreviewSettings = field(default_factory=PreviewSettings)
    metrics: Metrics = field(default_factory=Metrics)
    previews: PreviewEncoder = field(default_factory=PreviewEncoder)
    public_url: str | None = None
    #: The SQLite job history (GET /v1/jobs, finished jobs after a restart); None = live jobs only.
    history: JobHistory | None = None
    #: Whether the app starts and closes the runtime (and the history) itself.
    manage_runtime: bool = True
    #: How long a graceful shutdown lets the running job finish before cancelling it.
    shutdown_grace_s: float = 30.0
    closing: bool = False
    #: Open websocket sessions (hooocus_ws.session.Session), so a shutdown can let their outboxes flush.
    sessions: set[Any] = field(default_factory=set)
    idempotency: IdempotencyCache = field(init=False)
    #: Open (accepted) websockets per principal name; entries leave when they reach zero.
    ws_per_principal: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Awaited by drain() once the jobs are settled, e.g. the /mcp mount ending its sessions so open
    #: SSE streams do not hold the server's graceful-shutdown wait.
    on_drain: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.idempotency = IdempotencyCache(ttl_s=self.limits.event_retention_s)

    def image_url(self, sha256: str, extension: str) -> str:
        url = self.signer.sign(f"/v1/images/{sha256}.{extension}", ttl_s=self.limits.image_url_ttl_s)
        return (self.public_url.rstrip("/") + url) if self.public_url else url
