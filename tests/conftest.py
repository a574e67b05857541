"""Shared test setup: offline Hugging Face libraries, and the demo family built once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports datasets/transformers/huggingface_hub, which read these at import:
# never touch the network, and keep the datasets cache (lm-eval's JSON task data lands there)
# out of the home directory.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_HF_DATASETS_CACHE = tempfile.mkdtemp(prefix="evomerge-test-hf-datasets-")
os.environ["HF_DATASETS_CACHE"] = _HF_DATASETS_CACHE

REPO = Path(__file__).resolve().parent.parent


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture
def one_torch_thread():
    """Run a test's torch work on one thread (restored afterwards).

    For these tiny models a second thread gains little on an idle machine, and when another
    process competes for the 2 cores, OpenMP's spin-waiting makes 2 threads ~10x slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tasks_dir() -> Path:
    """The repository's lm-eval task YAMLs (`demo_<skill>`, `demo_<skill>_select`, groups)."""
    return REPO / "tasks"


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory: pytest.TempPathFactory):
    """The demo family (base + one fine-tune per skill), built once per test session (~1 min).

    Set EVOMERGE_TEST_DEMO_DIR to build into (and reuse across sessions) a fixed directory.
    """
    from evomerge.demo import build_demo_family

    fixed = os.environ.get("EVOMERGE_TEST_DEMO_DIR")
    out_dir = Path(fixed) if fixed else tmp_path_factory.mktemp("demo_family")
    return build_demo_family(out_dir, seed=0, progress=False)
