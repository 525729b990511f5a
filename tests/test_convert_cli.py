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


# ---- the output path: never delete what is there, umask modes ---------------------------------------
def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_out_onto_a_non_empty_dir_or_a_file_is_refused(trained_run, tmp_path, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("precious\n")
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(user)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "userdir: directory is not empty" in line and "notes.txt" in line and "--overwrite" in line
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "precious\n"
    f = tmp_path / "existing-file.txt"
    f.write_text("mine\n")
    for extra in ([], ["--overwrite"]):  # a file is never turned into a model directory
        assert main(["convert", "--checkpoint", str(trained_run), "--out", str(f), *extra]) == 2
        assert "not a directory" in _one_error_line(capsys.readouterr().err)
        assert f.read_text() == "mine\n"
    # an empty directory is fine without --overwrite
    (tmp_path / "empty").mkdir()
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_overwrite_replaces_only_the_model_files(trained_run, tmp_path, capsys):
    user = tmp_path / "userdir"
    # A previous export, sharded, plus the user's own files.
    Llama(ModelConfig.from_name("tinyllama-tiny")).save_pretrained(user, max_shard_size=200_000)
    assert (user / "model.safetensors.index.json").is_file()
    (user / "notes.txt").write_text("precious\n")
    (user / "README.md").write_text("# my model\n")
    (user / "eval").mkdir()
    (user / "eval" / "results.json").write_text("{}\n")
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(user), "--overwrite"]) == 0
    assert (user / "notes.txt").read_text() == "precious\n" and (user / "README.md").read_text() == "# my model\n"
    assert (user / "eval" / "results.json").read_text() == "{}\n"
    # the stale shards and index are gone (a loader would read them first), the new weights are the run's
    assert not list(user.glob("model-*.safetensors")) and not (user / "model.safetensors.index.json").exists()
    assert not list(user.glob(".tinyllama-export-*"))
    got, ref = Llama.from_pretrained(user), _trained_model(trained_run)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
    assert sorted(p.name for p in user.iterdir()) == sorted(
        ["README.md", "config.json", "eval", "generation_config.json", "model.safetensors", "notes.txt",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])


def test_gguf_onto_an_existing_file_needs_overwrite(trained_run, tmp_path, capsys):
    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an older model")
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(out), "--to", "gguf"]) == 2
    assert "already exists" in _one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"an older model"
    assert main(["convert", "--checkpoint", str(trained_run), "--out", str(out), "--to", "gguf", "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


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
