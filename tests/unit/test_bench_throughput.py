"""bench/throughput.py on the fake runner: every configuration serves every client's jobs over live
websockets and the report adds up, so the script never rots. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hooocus_bench_throughput", REPO / "bench" / "throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_bench_tiny_fake_run(tmp_path: Path) -> None:
    bench = _load_bench()
    out = tmp_path / "throughput.json"
    report = bench.main(["--runner", "fake", "--clients", "3", "--jobs-per-client", "2", "--steps", "2",
                         "--step-ms", "1", "--size", "64", "--image-number", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    configs = report["configs"]
    assert [(c["workers"], c["max_batch"]) for c in configs] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for config in configs:
        assert config["errors"] == [] and config["jobs"] == 6 and config["images"] == 12
        assert len(config["per_worker"]) == config["workers"] and config["runner_batches"] is True
        assert sum(w["jobs"] for w in config["per_worker"]) >= 6  # a split job counts on each device
        assert config["latency_p50_s"] <= config["latency_p95_s"]


def test_throughput_bench_rejects_an_empty_run() -> None:
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--clients", "0"])
