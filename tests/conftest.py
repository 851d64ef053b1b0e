"""Shared fixtures. Tests never touch the network; torch runs single-threaded (see house style B6)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.paths import fooocus_data_dir, parity_dir, parity_skip_reason, refdata_dir  # noqa: E402


@pytest.fixture(scope="session")
def refdata() -> Path:
    path = refdata_dir()
    if not path.is_dir():
        pytest.fail(f"golden data folder {path} not found; set HOOOCUS_REFDATA (default tests/data/refdata)")
    return path


@pytest.fixture(scope="session")
def fooocus_data() -> Path:
    path = fooocus_data_dir()
    if not path.is_dir():
        pytest.fail(f"Fooocus data folder {path} not found; set HOOOCUS_FOOOCUS_DATA (default tests/data/fooocus-data)")
    return path


@pytest.fixture(scope="session")
def clip_tokenizer_dir(fooocus_data: Path) -> Path:
    return fooocus_data / "clip_tokenizer"


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """``hooocus.cli.main`` (and the MCP/serve entry points) point the root logger at the stderr of
    their moment, which is capsys's and closed after the test; a later test's worker thread would
    then log into a closed stream ("Logging error" tracebacks in the output). Every test directory
    runs CLIs, so this lives here, once."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def parity_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size parity checkpoint: $HOOOCUS_PARITY_CHECKPOINT, else regenerated once per session
    with the parity folder's own recipe (never copied into the repo; ~80 s, 6.9 GB in a temp folder).
    Skips, with the parity tests' one reason, when the parity folder is absent."""
    reason = parity_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    given = os.environ.get("HOOOCUS_PARITY_CHECKPOINT")
    if given:
        return Path(given)
    path = tmp_path_factory.mktemp("parity-checkpoint") / "sdxl_fidelity_random.safetensors"
    subprocess.run([sys.executable, str(parity_dir() / "make_checkpoint.py"), str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def parity_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``models/`` folder with the extra weights the parity runs need (upscaler, inpaint head + patch,
    every LoRA a run names), written once per session by the parity folder's own recipes (a few seconds
    each, ~120 MB in a temp folder), laid out as the runtime looks for them (``<data_dir>/models``)."""
    reason = parity_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from tests.parity.recorded import build_extra_weights, lora_names, parity_runs

    names = sorted({name for run in parity_runs()
                    for name in lora_names(json.loads((run / "params.json").read_text(encoding="utf-8")))})
    models = tmp_path_factory.mktemp("parity-data") / "models"
    build_extra_weights(models, names, upscaler=True, inpaint=True)
    return models


@pytest.fixture(scope="session")
def describe_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``models/`` folder holding the tiny describe models (tests/describe_models.py), written once
    per session where set-up puts the real ones, so every door runs the real loaders."""
    from tests.describe_models import install_tiny_describe_models

    return install_tiny_describe_models(tmp_path_factory.mktemp("describe-data") / "models")
