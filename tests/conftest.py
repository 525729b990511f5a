import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The corpus shipped inside the package (src/tinyllama/assets/corpus, see its README: public-domain
    prose, PSF-licensed code): there in every clone and install, so no corpus test depends on ../shared."""
    from tinyllama.data.demo import demo_corpus_dir

    return demo_corpus_dir()


@pytest.fixture(scope="session")
def corpus_docs(corpus_dir) -> dict[str, list[str]]:
    """Its documents by source: 'moby-dick' (135 chapters), 'sotu' (66 addresses), 'code' (160 modules)."""
    import io
    import json

    import pyarrow.parquet as pq
    import zstandard

    docs: dict[str, list[str]] = {}
    with open(corpus_dir / "prose.jsonl.zst", "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            rec = json.loads(line)
            docs.setdefault(rec["meta"]["source"], []).append(rec["text"])
    docs["code"] = pq.read_table(corpus_dir / "code.parquet", columns=["content"]).column("content").to_pylist()
    return docs


# The Triton decode step keeps its tuned choices on disk (kernels/tuning_store.py): tests, and the processes
# they start, neither read the user's file nor write it; tests of the store point it at their own.
os.environ["TINYLLAMA_TUNING_CACHE"] = "off"


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


def _patch_triton_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with int(array) on a 1-element array, which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"): loops with run-time bounds then
    fail under TRITON_INTERPRET=1. Take the element instead. Test-only; compiled kernels are unaffected."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tinyllama_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tinyllama_patched = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_interpreter_for_numpy2()


def run_pytest_interpreted(target: str, timeout: int = 900) -> int:
    """Run pytest on `target` in a fresh process under TRITON_INTERPRET=1 (the interpreter is chosen when
    the kernels are defined, so it cannot be switched on in this process); assert it passed and nothing
    failed, and return how many tests passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", target],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and "failed" not in summary, r.stdout[-2000:]
    return int(passed.group(1))
