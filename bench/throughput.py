"""Serving throughput: N concurrent websocket clients against a live server, for 1 vs 2 device
workers and dynamic batching off (max_batch 1) vs on (max_batch 4), in one run.

    .venv/bin/python bench/throughput.py                                  # demo model, CPU workers
    .venv/bin/python bench/throughput.py --runner fake --step-ms 20       # scheduling only
    .venv/bin/python bench/throughput.py --clients 4 --jobs-per-client 2 --steps 2 --size 64   # tiny

Each client has its own token (its own principal, so the fair share applies), opens one websocket
and runs its jobs one after the other (closed loop: send ``generate``, wait for ``done``). Reported
per configuration: images/s over the whole round, job latency (``generate`` sent -> ``done``) p50 /
p95, and what each device worker did (jobs, busy seconds) from the engine's stats. Not a test: it
prints a table and writes JSON (default ``bench/results/throughput-cpu.json``). On a shared CPU the
numbers only compare configurations within one run; two CPU workers share the same cores.

``max_batch`` only changes anything when the runner batches (``batch_key``/``run_batch``); the JSON
says per configuration whether it did (``runner_batches``). The fake runner here batches: a batch
of k jobs sleeps one step time per step, as a GPU batch would roughly cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from engine.core.access import TokenStore  # noqa: E402
from engine.core.jobs import Engine, RunContext  # noqa: E402
from engine.core.request import GenerationRequest  # noqa: E402
from engine.core.runtime import Runtime, create_runtime  # noqa: E402
from engine.core.settings import Settings  # noqa: E402
from engine.core.store import ImageStore  # noqa: E402
from engine.core.testing import FakeRunner, fake_image  # noqa: E402
from hooocus_ws.app import create_app  # noqa: E402
from hooocus_ws.cli import uvicorn_config  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput-cpu.json"
#: Every network await of a client ends within this (house style: no await without a timeout).
RECV_TIMEOUT_S = 600.0


class BatchingFake(FakeRunner):
    """FakeRunner that batches jobs of one size: a batch costs one step time per step, whatever
    its size, and every job still gets its own events and images."""

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        return (request.size, self.steps_for(request))

    def run_batch(self, ctxs: list[RunContext]) -> None:
        steps = self.steps_for(ctxs[0].request)
        live = list(ctxs)
        for ctx in live:
            req = ctx.request
            seed = req.seed if req.seed is not None else 12345
            seeds = [seed + i for i in range(req.image_number)]
            ctx.started({"prompt": req.prompt, "steps": steps}, seeds, steps * len(seeds))
        for step in range(1, steps + 1):
            time.sleep(self.step_delay_s)
            for ctx in list(live):
                if ctx.cancel.is_set():
                    live.remove(ctx)  # leaves the batch; the engine ends it as cancelled
                    continue
                ctx.progress(step, steps)
        for ctx in live:
            req = ctx.request
            seed = req.seed if req.seed is not None else 12345
            for index in range(req.image_number):
                ctx.image(fake_image(req, index, seed + index, max_side_px=self.image_max_side_px))


def build_runtime(kind: str, *, workers: int, max_batch: int, batch_window_ms: float, step_ms: float,
                  clients: int, data_dir: Path) -> Runtime:
    settings = Settings(data_dir=data_dir, queue_size=max(64, clients * 2), max_queued_per_principal=4,
                        shutdown_grace_s=1.0, devices=("cpu",) * workers, max_batch=max_batch,
                        batch_window_ms=batch_window_ms)
    if kind == "demo":
        # No history: the benchmark measures scheduling and compute, not SQLite and PNG writes.
        return create_runtime(settings, model="demo", record_history=False)
    images = ImageStore()
    runners = [BatchingFake(step_delay_s=step_ms / 1000.0, image_max_side_px=64) for _ in range(workers)]
    engine = Engine(runners, max_queue=settings.queue_size, image_sink=images.put, max_batch=max_batch,
                    batch_window_ms=batch_window_ms)
    return Runtime(settings=settings, engine=engine, images=images)


def tokens_for(clients: int) -> tuple[str, list[str]]:
    tokens = [f"bench-token-{i:04d}-0123456789abcdef" for i in range(clients)]
    return "\n".join(f"client{i} {t} generate,cancel:own" for i, t in enumerate(tokens)), tokens


async def recv(ws: Any) -> Any:
    return await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)


async def client(url: str, token: str, params: dict[str, Any], jobs: int, start: asyncio.Event,
                 latencies: list[float], errors: list[str]) -> int:
    """One client: its jobs one after the other; returns the images it received."""
    images = 0
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None,
                       max_size=None, open_timeout=30) as ws:
        await recv(ws)  # hello
        await ws.send(json.dumps({"type": "set_preview", "enabled": False}))
        await recv(ws)
        await start.wait()
        for _ in range(jobs):
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "generate", "params": params}))
            while True:
                raw = await recv(ws)
                if isinstance(raw, bytes):
                    images += 1
                    continue
                message = json.loads(raw)
                if message["type"] == "done":
                    latencies.append(time.perf_counter() - sent)
                    break
                if message["type"] in ("error", "failed", "cancelled"):
                    errors.append(f"{message['type']}: {message.get('code')} {message.get('message')}")
                    break
    return images


async def round_of(url: str, tokens: Sequence[str], params: dict[str, Any], jobs: int) -> dict[str, Any]:
    start = asyncio.Event()
    latencies: list[float] = []
    errors: list[str] = []
    tasks = [asyncio.create_task(client(url, t, params, jobs, start, latencies, errors)) for t in tokens]
    await asyncio.sleep(0.2)  # every client connected and waiting
    began = time.perf_counter()
    start.set()
    images = sum(await asyncio.gather(*tasks))
    return {"wall_s": time.perf_counter() - began, "images": images, "latencies_s": latencies, "errors": errors}


def percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_config(args: argparse.Namespace, workers: int, max_batch: int) -> dict[str, Any]:
    text, tokens = tokens_for(args.clients)
    runtime = build_runtime(args.runner, workers=workers, max_batch=max_batch, batch_window_ms=args.batch_window_ms,
                            step_ms=args.step_ms, clients=args.clients, data_dir=Path(tempfile.mkdtemp(prefix="hb-")))
    app = create_app(runtime, tokens=TokenStore.parse(text), manage_runtime=False)
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, max_message_bytes=64 * 1024,
                                           log_level="warning"))
    runtime.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        url = f"ws://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/ws"
        params = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size, "height": args.size,
                  "image_number": args.image_number}
        # warm-up: one job per worker (each loads its model on its own thread)
        asyncio.run(round_of(url, tokens[:workers], params, 1))
        before = runtime.engine.stats()
        result = asyncio.run(round_of(url, tokens, params, args.jobs_per_client))
        after = runtime.engine.stats()
    finally:
        server.should_exit = True
        thread.join(10)
        runtime.close()
    lat = result["latencies_s"]
    runner = runtime.engine.runner
    return {
        "workers": workers, "max_batch": max_batch,
        "runner_batches": callable(getattr(runner, "run_batch", None)) and callable(getattr(runner, "batch_key", None)),
        "jobs": len(lat), "images": result["images"], "wall_s": round(result["wall_s"], 4),
        "images_per_s": round(result["images"] / result["wall_s"], 4) if result["wall_s"] > 0 else None,
        "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
        "latency_mean_s": statistics.fmean(lat) if lat else None,
        "per_worker": [{"device": a.device, "jobs": a.jobs_done - b.jobs_done, "busy_s": round(a.busy_s - b.busy_s, 4)}
                       for a, b in zip(after.workers, before.workers, strict=True)],
        "errors": result["errors"],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", choices=["demo", "fake"], default="demo")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs-per-client", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--image-number", type=int, default=1)
    parser.add_argument("--step-ms", type=float, default=20.0, help="fake runner: sleep per step")
    parser.add_argument("--workers", default="1,2", help="device workers to compare (CPU entries)")
    parser.add_argument("--max-batch", default="1,4", help="max_batch values to compare")
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.jobs_per_client < 1:
        parser.error("--clients and --jobs-per-client must be >= 1")
    args.workers_list = [int(w) for w in args.workers.split(",")]
    args.max_batch_list = [int(b) for b in args.max_batch.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "runner": args.runner, "clients": args.clients, "jobs_per_client": args.jobs_per_client,
        "steps": args.steps, "size_px": args.size, "image_number": args.image_number,
        "batch_window_ms": args.batch_window_ms, "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0], "configs": []}
    print(f"runner {args.runner}: {args.clients} clients x {args.jobs_per_client} jobs, {args.steps} steps, "
          f"{args.size}x{args.size}, {args.image_number} image(s)/job, CPU workers")
    print(f"{'workers':>7} {'max_batch':>9} {'images/s':>9} {'p50 s':>8} {'p95 s':>8}  per worker (jobs)")
    for workers in args.workers_list:
        for max_batch in args.max_batch_list:
            row = run_config(args, workers, max_batch)
            report["configs"].append(row)
            jobs = ",".join(str(w["jobs"]) for w in row["per_worker"])
            print(f"{workers:>7} {max_batch:>9} {row['images_per_s'] or 0:>9.3f} {row['latency_p50_s'] or 0:>8.3f} "
                  f"{row['latency_p95_s'] or 0:>8.3f}  {jobs}{'  ERRORS' if row['errors'] else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
