"""`tinyllama bench train` on the CPU with a tiny model: runs every variant, prints the table, writes JSON."""

from __future__ import annotations

import json

import pytest

from tinyllama.cli import main


def test_bench_train_cli_tiny(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    rc = main(["bench", "train", "--config", "tinyllama-tiny", "--micro-batch", "1", "--seq-len", "16",
               "--steps", "1", "--warmup", "1", "--variants", "ours,reference,hf-eager", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "tokens/s" in text and "ours / hf-eager:" in text and "ours / reference:" in text
    data = json.loads(out.read_text())
    res = {r["variant"]: r for r in data["results"]}
    assert set(res) == {"ours", "reference", "hf-eager"}
    for r in res.values():
        assert r["error"] is None and r["tokens_per_s"] > 0 and 5 < r["final_loss"] < 15
    # same init, same batch, same step: the fast path's loss equals the reference's (fp32 on the CPU;
    # on a GPU both run under bf16 autocast, the fast path with a bf16 residual stream)
    tol = 1e-2 if data["device"] != "cpu" else 1e-3
    assert abs(res["ours"]["final_loss"] - res["reference"]["final_loss"]) < tol


def test_bench_train_bad_arguments(capsys):
    assert main(["bench", "train", "--config", "tinyllama-tiny", "--variants", "ours,megatron"]) == 2
    assert "megatron" in capsys.readouterr().err
    assert main(["bench", "train", "--config", "no-such-model"]) == 2
    assert main(["bench", "train", "--config", "tinyllama-tiny", "--seq-len", "4096"]) == 2


def test_bench_train_token_file(tmp_path, capsys):
    import numpy as np

    from tinyllama.bench.train import TokenBatches

    p = tmp_path / "tokens.npy"
    np.save(p, np.arange(100, dtype=np.uint16))
    b = TokenBatches(32000, 16, 2, data=str(p))
    first = b.next()
    assert first.shape == (2, 17) and first[0, 0] == 0 and first[1, 0] == 17
    for _ in range(3):
        b.next()  # wraps around without error
    b.reset()
    assert b.next().equal(first)
    np.save(p, np.array([5, 40000], dtype=np.uint16).repeat(20))
    assert main(["bench", "train", "--config", "tinyllama-tiny", "--seq-len", "16", "--data", str(p)]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err


def test_bench_train_prepared_dataset(tmp_path):
    from tinyllama.bench.train import TokenBatches
    from tinyllama.data.shards import TokenSource
    from tinyllama.tokenizer import Tokenizer

    text = tmp_path / "doc.txt"
    text.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 20)
    assert main(["prepare", str(text), "--output", str(tmp_path / "ds"), "--val-fraction", "0", "--no-progress"]) == 0
    src = TokenSource(tmp_path / "ds", "train")
    b = TokenBatches(32000, 16, 2, data=str(tmp_path / "ds"))
    first = b.next()
    assert first.shape == (2, 17) and first.flatten().tolist() == src.read(0, 34).tolist()
    assert Tokenizer().decode(first[0].tolist()).startswith("Call me Ishmael")


def test_bench_train_missing_liger_is_reported_in_its_row(tmp_path, capsys, monkeypatch):
    """hf-liger without liger_kernel: its row names the package, the other variants still run."""
    import sys

    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    out = tmp_path / "bench.json"
    rc = main(["bench", "train", "--config", "tinyllama-tiny", "--micro-batch", "1", "--seq-len", "16", "--steps", "1",
               "--warmup", "1", "--variants", "hf-liger,ours", "--json", str(out)])
    assert rc == 1
    res = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["ours", "hf-liger"]  # liger last
    assert "liger_kernel not installed" in res["hf-liger"]["error"] and res["ours"]["error"] is None
