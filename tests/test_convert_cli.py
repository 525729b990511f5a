"""`tinyllama convert`: training checkpoints (DCP) to Hugging Face directories and GGUF."""

from __future__ import annotations

import importlib.util
import os
import stat

import pytest
import torch

from tinyllama.cli import main
from tinyllama.config import ModelConfig
from tinyllama.model import Llama
from tinyllama.train.checkpoint import load_model_weights
from tinyllama.train.config import run_config_from_dict
from tinyllama.train.trainer import pretrain


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    run = {
        "model": {"preset": "tinyllama-tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "data": {"sources": "synthetic", "seq_len": 16, "vocab_size": 32000},
        "train": {"out_dir": str(out), "micro_batch": 2, "global_batch": 2, "max_steps": 3, "eval_every": 0,
                  "eval_blocks": 2, "save_every": 2, "progress": False, "tensorboard": False, "device": "cpu"},
    }
    pretrain(run_config_from_dict(run))
    return out


def _trained_model(run_dir) -> Llama:
    m = Llama(ModelConfig.from_name("tinyllama-tiny"))
    load_model_weights(run_dir, m)
    return m.eval()


def test_checkpoint_to_hf_matches_trained_weights_and_transformers(trained_run, tmp_path, capsys):
    assert main(["convert", "--checkpoint", str(trained_run / "checkpoints" / "step-0000003"),
                 "--out", str(tmp_path / "hf")]) == 0
    assert "step 3" in capsys.readouterr().out
    ref = _trained_model(trained_run)
    got = Llama.from_pretrained(tmp_path / "hf")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    # The trained weights differ from a fresh init (the checkpoint really holds training).
    torch.manual_seed(1337)
    fresh = Llama(ModelConfig.from_name("tinyllama-tiny"))
    assert not torch.equal(fresh.layers[0].mlp.up_proj.weight, got.layers[0].mlp.up_proj.weight)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 32000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids), rtol=1e-4, atol=1e-4)


def test_run_dir_uses_latest_and_bf16_output(trained_run, tmp_path):
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    got = Llama.from_pretrained(tmp_path / "hf")
    assert got.lm_head.weight.dtype == torch.bfloat16
    ref = _trained_model(trained_run)
    assert torch.equal(got.lm_head.weight, ref.lm_head.weight.bfloat16())


def test_hf_dir_round_trip_and_errors(trained_run, tmp_path, capsys):
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "a")]) == 0
    assert main(["convert", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["convert", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["convert", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_checkpoint_to_gguf(trained_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(out), "--to", "gguf", "--quant", "f16"]) == 0
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" in names and "blk.1.ffn_down.weight" in names


# ---- the output path: umask modes -------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exports_get_the_modes_the_umask_implies(trained_run, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main(["convert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "hf")]) == 0
        (tmp_path / "merge").mkdir()
        assert main(["convert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "merge")]) == 0
        if importlib.util.find_spec("gguf"):
            assert main(["convert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "m.gguf"),
                         "--to", "gguf"]) == 0
            assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~umask
    for d in ("hf", "merge"):
        files = list((tmp_path / d).iterdir())
        assert "model.safetensors" in {f.name for f in files}
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}
