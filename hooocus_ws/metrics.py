"""Counters for ``GET /metrics`` (Prometheus text format 0.0.4). Written on the event loop only."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from engine.core.jobs import Engine, WorkerStats


@dataclass
class Metrics:
    auth_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    ws_connections: int = 0
    ws_connections_total: int = 0
    ws_messages_in: int = 0
    ws_messages_rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    previews_sent: int = 0
    previews_dropped: int = 0
    http_generate: int = 0

    def render(self, engine: Engine) -> str:
        stats = engine.stats()
        # A labelled family always shows one sample, so a scraper sees it before the first event.
        auth_reasons = sorted(self.auth_failures) or ["bad_token"]
        rejected_codes = sorted(self.ws_messages_rejected) or ["invalid_json"]
        caches = [w for w in stats.workers if w.model_cache is not None]
        lines = [
            *_family("hooocus_queue_depth", "gauge", "Jobs waiting in the queue (not counting the running one).",
                     [("", stats.queue_depth)]),
            *_family("hooocus_job_running", "gauge", "Jobs running now (at most one per device worker).",
                     [("", len(stats.running_job_ids))]),
            *_family("hooocus_worker_busy", "gauge", "1 while the device worker runs a job.",
                     [(_worker_labels(w), int(w.current_job_id is not None)) for w in stats.workers]),
            *_family("hooocus_worker_busy_seconds_total", "counter", "Seconds the device worker spent running jobs.",
                     [(_worker_labels(w), f"{w.busy_s:.3f}") for w in stats.workers]),
            *_family("hooocus_worker_jobs_total", "counter", "Jobs the device worker finished (any outcome).",
                     [(_worker_labels(w), w.jobs_done) for w in stats.workers]),
            *_family("hooocus_worker_memory_bytes", "gauge",
                     "Memory in use: torch.cuda.memory_allocated on a CUDA device, process RSS on the CPU.",
                     [(_worker_labels(w), w.memory_bytes) for w in stats.workers if w.memory_bytes is not None]),
            *_family("hooocus_worker_model_cache_bytes", "gauge",
                     "Bytes of the models the device worker keeps loaded (parameters and buffers).",
                     [(_worker_labels(w), w.model_cache.used_bytes) for w in caches]),
            *_family("hooocus_worker_model_cache_entries", "gauge",
                     "Models (checkpoints, refiners, upscaler, adapters) the device worker keeps loaded.",
                     [(_worker_labels(w), w.model_cache.entries) for w in caches]),
            *_family("hooocus_worker_model_cache_budget_bytes", "gauge",
                     "The device worker's model memory budget (--model-memory-gb, else automatic).",
                     [(_worker_labels(w), w.model_cache.budget_bytes) for w in caches]),
            *_family("hooocus_worker_model_evictions_total", "counter",
                     "Models dropped to stay within the budget (least recently used first).",
                     [(_worker_labels(w), w.model_cache.evictions) for w in caches]),
            *_family("hooocus_jobs_total", "counter", "Finished jobs by outcome.",
                     [(f'{{outcome="{o}"}}', stats.jobs_by_outcome.get(o, 0)) for o in ("done", "cancelled", "failed")]),
            *_family("hooocus_steps_total", "counter", "Sampling steps run; rate() of it is the step rate.",
                     [("", stats.steps_total)]),
            *_family("hooocus_auth_failures_total", "counter", "Refused handshakes and HTTP requests by reason.",
                     [(f'{{reason="{r}"}}', self.auth_failures[r]) for r in auth_reasons]),
            *_family("hooocus_ws_connections", "gauge", "Open websocket connections.", [("", self.ws_connections)]),
            *_family("hooocus_ws_connections_total", "counter", None, [("", self.ws_connections_total)]),
            *_family("hooocus_ws_messages_total", "counter", None, [("", self.ws_messages_in)]),
            *_family("hooocus_ws_messages_rejected_total", "counter", "Client messages answered with an error, by code.",
                     [(f'{{code="{c}"}}', self.ws_messages_rejected[c]) for c in rejected_codes]),
            *_family("hooocus_previews_sent_total", "counter", "Preview frames sent.", [("", self.previews_sent)]),
            *_family("hooocus_previews_dropped_total", "counter",
                     "Previews replaced by a newer one before a slow client took them.", [("", self.previews_dropped)]),
            *_family("hooocus_http_generate_total", "counter", None, [("", self.http_generate)]),
        ]
        return "\n".join(lines) + "\n"


def _worker_labels(worker: WorkerStats) -> str:
    # The index tells apart workers on one device name ("--devices cpu,cpu"). The name comes from
    # the runner (a remote runner may name its device freely), so it is escaped as 0.0.4 asks.
    device = worker.device.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{worker="{worker.index}",device="{device}"}}'


def _family(name: str, kind: str, help_text: str | None, samples: list[tuple[str, object]]) -> list[str]:
    """One metric family in text format 0.0.4: HELP (where there is one), TYPE, then one line per
    (label set, value) sample; the label set is "" or already rendered as ``{key="value"}``."""
    head = [f"# HELP {name} {help_text}"] if help_text is not None else []
    return [*head, f"# TYPE {name} {kind}", *(f"{name}{labels} {value}" for labels, value in samples)]
