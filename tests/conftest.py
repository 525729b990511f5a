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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
