"""`tinyllama bench generate` end to end on the tiny preset: the JSON it writes, and which rows it times."""

import json

import pytest
import torch

from tinyllama.cli import main

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BASE = ["bench", "generate", "--preset", "tinyllama-tiny", "--prompt-len", "8", "--new-tokens", "6", "--no-hf",
        "--repeats", "1"]


def test_bench_generate_writes_its_rows_cpu(tmp_path):
    out = tmp_path / "gen.json"
    assert main(BASE + ["--device", "cpu", "--batch-sizes", "1,2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["name"], r["batch"]) for r in result["rows"] if "batch" in r}
    assert ("ours eager", 1) in rows and ("ours eager", 2) in rows
    assert all(r["tokens_per_s"] > 0 for r in result["rows"] if "tokens_per_s" in r)
    assert not (tmp_path / "gen.json.tmp").exists()


@needs_cuda
def test_bench_generate_without_the_torch_step_cuda(tmp_path):
    # --no-torch-step: the Triton step's rows only, no torch.compile'd step timed beside them
    out = tmp_path / "gen.json"
    assert main(BASE + ["--batch-sizes", "1,2", "--triton-max-batch", "2", "--no-torch-step", "--json", str(out)]) == 0
    names = [(r["name"], r.get("batch")) for r in json.loads(out.read_text())["rows"]]
    assert ("ours Triton decode step + CUDA graph", 1) in names and ("ours Triton decode step + CUDA graph", 2) in names
    assert not any(name == "ours compiled + CUDA graph" for name, _ in names), names


def test_bench_generate_transformers_rows_compile_only_where_named_cpu(tmp_path, monkeypatch):
    # On CUDA, transformers' `generate` with a static cache compiles the forward itself unless told not to: the
    # "static cache" row must pass disable_compile (its H200 number was a compiled one). (The compiled row, which
    # leaves the compiling to transformers, runs on CUDA only.)
    transformers = pytest.importorskip("transformers")
    seen = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("cache_implementation"), kwargs.get("disable_compile")))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    out = tmp_path / "gen.json"
    base = [a for a in BASE if a != "--no-hf"]
    assert main(base + ["--device", "cpu", "--batch-sizes", "1", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    version = transformers.__version__
    assert rows[f"transformers {version} generate (eager)"]["tokens_per_s"] > 0
    assert rows[f"transformers {version} generate (static cache)"]["tokens_per_s"] > 0
    assert set(seen) == {(None, None), ("static", True)}, seen
