"""Shared fixtures. Tests never touch the network; torch runs single-threaded (see house style B6)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.paths import fooocus_data_dir, parity_dir, refdata_dir  # noqa: E402,F401


@pytest.fixture(scope="session")
def refdata() -> Path:
    path = refdata_dir()
    if not path.is_dir():
        pytest.fail(f"golden data folder {path} not found; set HOOOCUS_REFDATA")
    return path


@pytest.fixture(scope="session")
def fooocus_data() -> Path:
    return fooocus_data_dir()


@pytest.fixture(scope="session")
def clip_tokenizer_dir() -> Path:
    return fooocus_data_dir() / "clip_tokenizer"


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
