"""Counters for ``GET /metrics`` (Prometheus text format 0.0.4). Written on the event loop only."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from engine.core.jobs import Engine


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
        lines = [
            "# HELP hooocus_queue_depth Jobs waiting in the queue (not counting the running one).",
            "# TYPE hooocus_queue_depth gauge",
            f"hooocus_queue_depth {stats.queue_depth}",
            "# HELP hooocus_job_running 1 while a job holds the GPU worker.",
            "# TYPE hooocus_job_running gauge",
            f"hooocus_job_running {int(stats.running_job_id is not None)}",
            "# HELP hooocus_jobs_total Finished jobs by outcome.",
            "# TYPE hooocus_jobs_total counter",
        ]
        for outcome in ("done", "cancelled", "failed"):
            lines.append(f'hooocus_jobs_total{{outcome="{outcome}"}} {stats.jobs_by_outcome.get(outcome, 0)}')
        lines += [
            "# HELP hooocus_steps_total Sampling steps run; rate() of it is the step rate.",
            "# TYPE hooocus_steps_total counter",
            f"hooocus_steps_total {stats.steps_total}",
            "# HELP hooocus_auth_failures_total Refused handshakes and HTTP requests by reason.",
            "# TYPE hooocus_auth_failures_total counter",
        ]
        for reason in sorted(self.auth_failures) or ["bad_token"]:
            lines.append(f'hooocus_auth_failures_total{{reason="{reason}"}} {self.auth_failures[reason]}')
        lines += [
            "# HELP hooocus_ws_connections Open websocket connections.",
            "# TYPE hooocus_ws_connections gauge",
            f"hooocus_ws_connections {self.ws_connections}",
            "# TYPE hooocus_ws_connections_total counter",
            f"hooocus_ws_connections_total {self.ws_connections_total}",
            "# TYPE hooocus_ws_messages_total counter",
            f"hooocus_ws_messages_total {self.ws_messages_in}",
            "# HELP hooocus_ws_messages_rejected_total Client messages answered with an error, by code.",
            "# TYPE hooocus_ws_messages_rejected_total counter",
        ]
        for code in sorted(self.ws_messages_rejected) or ["invalid_json"]:
            lines.append(f'hooocus_ws_messages_rejected_total{{code="{code}"}} {self.ws_messages_rejected[code]}')
        lines += [
            "# HELP hooocus_previews_sent_total Preview frames sent.",
            "# TYPE hooocus_previews_sent_total counter",
            f"hooocus_previews_sent_total {self.previews_sent}",
            "# HELP hooocus_previews_dropped_total Previews replaced by a newer one before a slow client took them.",
            "# TYPE hooocus_previews_dropped_total counter",
            f"hooocus_previews_dropped_total {self.previews_dropped}",
            "# TYPE hooocus_http_generate_total counter",
            f"hooocus_http_generate_total {self.http_generate}",
        ]
        return "\n".join(lines) + "\n"
