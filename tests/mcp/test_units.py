"""Small pure parts of the MCP front door: thumbnails within a budget, MIME sniffing, progress
values, result rendering, and the HTTP allowlists."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from engine.core.events import Done, Progress, Started
from hooocus_mcp._sdk import sniff_image_mime
from hooocus_mcp.backend import ImageInfo, JobView, events_until_terminal
from hooocus_mcp.http import security_settings
from hooocus_mcp.thumbnails import b64_len, preview_thumbnail, thumbnails_within_budget
from hooocus_mcp.tools import ProgressReporter, job_result, summary_line


def encoded(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)  # noise: the worst case for size
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_thumbnails_fit_budget_and_max_side() -> None:
    images = [encoded(640, 480, seed=i) for i in range(3)]
    thumbs = thumbnails_within_budget(images, max_side_px=256, budget_b64_chars=150_000)
    assert all(t is not None for t in thumbs)
    assert sum(t.b64_chars for t in thumbs) <= 150_000
    for thumb in thumbs:
        decoded = Image.open(io.BytesIO(thumb.data))
        assert decoded.format == "WEBP" and max(decoded.size) <= 256 and (thumb.width, thumb.height) == decoded.size
        assert abs(decoded.width / decoded.height - 640 / 480) < 0.02


def test_tight_budget_shrinks_or_drops_thumbnails_but_never_overflows() -> None:
    images = [encoded(256, 256, seed=i) for i in range(4)]
    thumbs = thumbnails_within_budget(images, max_side_px=256, budget_b64_chars=12_000)
    kept = [t for t in thumbs if t is not None]
    assert kept and sum(t.b64_chars for t in kept) <= 12_000
    assert all(max(t.width, t.height) < 256 for t in kept)
    assert thumbnails_within_budget(images[:1], max_side_px=256, budget_b64_chars=10) == [None]


def test_small_images_are_not_upscaled_and_jpeg_is_available() -> None:
    [thumb] = thumbnails_within_budget([encoded(40, 30)], max_side_px=512, budget_b64_chars=100_000, fmt="jpeg")
    assert thumb is not None and (thumb.width, thumb.height) == (40, 30) and thumb.mime == "image/jpeg"
    assert b64_len(3) == 4 and b64_len(4) == 8 and b64_len(0) == 0


def test_preview_thumbnail_from_rgb_array() -> None:
    thumb = preview_thumbnail(np.zeros((600, 300, 3), dtype=np.uint8), max_side_px=128)
    assert thumb is not None and thumb.mime == "image/jpeg" and (thumb.width, thumb.height) == (64, 128)


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_sniff_image_mime(fmt: str, mime: str) -> None:
    assert sniff_image_mime(encoded(8, 8, fmt)) == mime


def test_sniff_unknown_bytes() -> None:
    assert sniff_image_mime(b"GIF89a....") is None


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_progress_reporter_throttles_but_always_ends_at_total(anyio_backend: str) -> None:
    sent: list[tuple[float, float | None, str | None]] = []

    async def send(progress: float, total: float | None, message: str | None) -> None:
        sent.append((progress, total, message))

    now = [0.0]
    reporter = ProgressReporter(send, min_interval_s=1.0, clock=lambda: now[0])
    await reporter.on_event(Started(job_id="j", total_steps=8))
    for image_index in range(2):
        for step in range(1, 5):
            now[0] += 0.4
            await reporter.on_event(Progress(job_id="j", step=step, total_steps=4, image_index=image_index,
                                             image_count=2))
    await reporter.on_event(Progress(job_id="j", step=4, total_steps=4, image_index=1, image_count=2))  # repeat
    await reporter.on_event(Done(job_id="j"))
    values = [p for p, _, _ in sent]
    assert values == sorted(set(values)) and values[-1] == 8 and all(t == 8 for _, t, _ in sent)
    assert len(values) < 8  # throttled
    assert sent[0][2] == "image 1/2 · step 1/4 · sample"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_events_until_terminal_stops_at_the_terminal_event_and_unsubscribes(anyio_backend: str) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for event in (Started(job_id="j", total_steps=1), Done(job_id="j"), Progress(job_id="j", step=9)):
        queue.put_nowait(event)
    unsubscribed: list[bool] = []
    async with events_until_terminal(queue, lambda: unsubscribed.append(True)) as events:
        kinds = [event.kind async for event in events]
        assert not unsubscribed  # still following while the context is open
    assert kinds == ["started", "done"]  # nothing after the terminal event is read
    assert unsubscribed == [True] and queue.qsize() == 1


def test_summary_lines_tell_the_model_what_to_do_next() -> None:
    image = ImageInfo(index=0, seed="42", sha256="a" * 64, mime="image/png", width=64, height=64, size_bytes=10)
    done = job_result(JobView(job_id="j1", state="done", seeds=("42",), total_steps=4, done_steps=4, images=(image,),
                              created_at=1.0, started_at=2.0, finished_at=3.5))
    assert summary_line(done) == f"Generated 1 image (seeds 42) in 1.5s. Full-size: hooocus://images/{'a' * 64}"
    assert done.timings.queued_ms == 1000 and done.timings.run_ms == 1500
    queued = job_result(JobView(job_id="j2", state="queued", queue_position=3))
    assert queued.status == "running" and "queued at position 3" in summary_line(queued)
    assert "get_job(job_id='j2')" in summary_line(queued)
    failed = job_result(JobView(job_id="j3", state="failed", error={"code": "out_of_memory", "message": "smaller"}))
    assert summary_line(failed) == "Job j3 failed (out_of_memory): smaller"


def test_security_settings_allow_loopback_and_configured_names_only() -> None:
    settings = security_settings(["gpu.example.com", "10.0.0.5:8188"], ["https://app.example.com/"])
    assert {"127.0.0.1:*", "localhost", "gpu.example.com", "gpu.example.com:*", "10.0.0.5:8188"} <= set(
        settings.allowed_hosts)
    assert "10.0.0.5:*" not in settings.allowed_hosts and "0.0.0.0:*" not in settings.allowed_hosts
    assert "https://app.example.com" in settings.allowed_origins
    assert settings.enable_dns_rebinding_protection


def test_star_host_does_not_disable_the_mcp_host_check() -> None:
    settings = security_settings(["*"], [])
    assert "*" not in settings.allowed_hosts and settings.enable_dns_rebinding_protection
