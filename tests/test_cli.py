"""CLI: help, generation smoke test, and one clear error line (no traceback) for each bad input."""

import json
import subprocess
import sys

import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.cli import main


def run_cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    Llama(ModelConfig.from_name("tinyllama-tiny")).save_pretrained(d)
    return d


def test_help_lists_subcommands(capsys):
    rc, out, _ = run_cli([], capsys)
    for name in ("generate", "prepare", "pretrain", "chat", "eval", "convert", "serve", "bench"):
        assert name in out
    assert rc == 0


def test_generate_from_directory(tiny_dir, capsys):
    rc, out, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt", "Call me Ishmael.",
                            "--max-new-tokens", "8", "--temperature", "0"], capsys)
    assert rc == 0, err
    assert out.startswith("Call me Ishmael.") and len(out) > len("Call me Ishmael.\n")


def test_generate_compile_flag_gives_the_same_greedy_text(tiny_dir, capsys):
    # on CPU --compile falls back to the eager engine; on CUDA it takes the compiled/Triton path
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Call me Ishmael.", "--max-new-tokens", "8",
            "--temperature", "0", "--dtype", "float32"]
    rc, plain, err = run_cli(args, capsys)
    assert rc == 0, err
    rc, compiled, err = run_cli(args + ["--compile"], capsys)
    assert rc == 0, err
    assert compiled == plain


def _assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model_dir(tmp_path, capsys):
    rc, _, err = run_cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    _assert_one_line_error(rc, err, str(tmp_path / "nope"), "not found")


def test_wrong_preset(capsys):
    rc, _, err = run_cli(["generate", "--random-preset", "llama-70b", "--prompt", "x"], capsys)
    _assert_one_line_error(rc, err, "llama-70b", "tinyllama-1.1b")


def test_checkpoint_of_another_architecture(tmp_path, tiny_dir, capsys):
    import shutil

    other = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, other)
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "vocab_size": 50257}))
    rc, _, err = run_cli(["generate", "--model", str(other), "--prompt", "x"], capsys)
    _assert_one_line_error(rc, err, "config.json", "gpt2")


def test_weights_do_not_match_config(tmp_path, tiny_dir, capsys):
    import shutil

    other = tmp_path / "mismatch"
    shutil.copytree(tiny_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(["generate", "--model", str(other), "--prompt", "x"], capsys)
    _assert_one_line_error(rc, err, str(other), "layers.2")


def test_truncated_safetensors(tmp_path, tiny_dir, capsys):
    import shutil

    other = tmp_path / "trunc"
    shutil.copytree(tiny_dir, other)
    f = other / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(["generate", "--model", str(other), "--prompt", "x"], capsys)
    _assert_one_line_error(rc, err, "model.safetensors", "truncated")


def test_missing_safetensors(tmp_path, tiny_dir, capsys):
    import shutil

    other = tmp_path / "noweights"
    shutil.copytree(tiny_dir, other)
    (other / "model.safetensors").unlink()
    rc, _, err = run_cli(["generate", "--model", str(other), "--prompt", "x"], capsys)
    _assert_one_line_error(rc, err, "no model.safetensors")


def test_bad_sampling_value(tiny_dir, capsys):
    rc, _, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "1.5"], capsys)
    _assert_one_line_error(rc, err, "top_p")


def test_console_entry_point_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyllama", "generate", "--model", str(tmp_path / "missing"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "missing" in proc.stderr


def test_generate_stop_string_and_sampling_flags(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0"]
    rc, full, err = run_cli(args, capsys)
    assert rc == 0, err
    continuation = full[len("Hello"):-1]
    assert len(continuation) > 2
    stop = continuation[1:3]
    rc, out, err = run_cli(args + ["--stop", stop, "--min-p", "0.05", "--repetition-penalty", "1.0"], capsys)
    assert rc == 0, err
    assert out == "Hello" + continuation[: continuation.index(stop)] + "\n"
