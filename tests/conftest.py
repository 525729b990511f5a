import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI lays a copy of shared/ beside the clone (../shared); tests that need the corpus skip without it.
SHARED = Path(os.environ.get("TINYLLAMA_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "data" / "corpus"


@pytest.fixture
def corpus_dir() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The suite runs many tiny matrix products: one thread is as fast, and immune to OpenMP spin-waits
    # on a busy 2-core CI machine (5-20x slower with two threads there).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
