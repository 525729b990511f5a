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
    _assert_one_line_error(rc, err, "--top-p", "1.5")


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


# ---- bad numbers and devices: one error line naming the flag or field, for every command ---------------------
_GEN = ["generate", "--random-preset", "tinyllama-tiny", "--prompt", "hi", "--max-new-tokens", "2"]
_CHAT = ["chat", "--random-preset", "tinyllama-tiny"]
_SERVE = ["serve", "--random-preset", "tinyllama-tiny"]
_EVAL = ["eval", "--random-preset", "tinyllama-tiny", "--perplexity", "{tmp}/none.txt"]
# Were a check missing, these would run quickly (tiny model, synthetic tokens, one step) and fail on rc == 0.
_PRETRAIN = ["pretrain", "--out", "{tmp}/run", "--model.preset", "tinyllama-tiny", "--data.sources", "synthetic",
             "--data.seq_len", "16", "--train.max_steps", "1", "--train.micro_batch", "1", "--train.global_batch", "1",
             "--train.progress", "false", "--train.tensorboard", "false", "--train.export_hf", "null",
             "--train.sample_prompt", "null"]
_SFT = ["sft", "--model", "{tmp}/m", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/sft"]
_DPO = ["dpo", "--model", "{tmp}/m", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/dpo"]
_BENCH_TRAIN = ["bench", "train", "--config", "tinyllama-tiny", "--seq-len", "16", "--micro-batch", "1", "--variants", "ours"]
_BENCH_GEN = ["bench", "generate", "--preset", "tinyllama-tiny", "--prompt-len", "4", "--new-tokens", "4", "--no-hf",
              "--no-compile", "--batch-sizes", "1"]

BAD_VALUES = [
    (_GEN + ["--device", "quantum"], "--device"),
    (_GEN + ["--device", "cuda:x"], "--device"),
    (_GEN + ["--temperature", "nan"], "--temperature"),
    (_GEN + ["--temperature", "inf"], "--temperature"),
    (_GEN + ["--temperature", "-0.5"], "--temperature"),
    (_GEN + ["--top-p", "nan"], "--top-p"),
    (_GEN + ["--top-p", "0"], "--top-p"),
    (_GEN + ["--min-p", "inf"], "--min-p"),
    (_GEN + ["--repetition-penalty", "inf"], "--repetition-penalty"),
    (_GEN + ["--repetition-penalty", "nan"], "--repetition-penalty"),
    (_GEN + ["--max-new-tokens", "-1"], "--max-new-tokens"),
    (_GEN + ["--top-k", "0"], "--top-k"),
    (_GEN + ["--seed", str(2**64)], "--seed"),
    (_GEN + ["--dtype", "float64"], "--dtype"),
    (_CHAT + ["--temperature", "nan"], "--temperature"),
    (_CHAT + ["--top-p", "inf"], "--top-p"),
    (_CHAT + ["--max-new-tokens", "-5"], "--max-new-tokens"),
    (_CHAT + ["--device", "quantum"], "--device"),
    (_SERVE + ["--port", "-1"], "--port"),
    (_SERVE + ["--port", "nan"], "--port"),
    (_SERVE + ["--max-batch-size", "0"], "--max-batch-size"),
    (_SERVE + ["--max-seq-len", "1"], "--max-seq-len"),
    (_SERVE + ["--threads", "-2"], "--threads"),
    (_SERVE + ["--device", "quantum"], "--device"),
    (_SERVE + ["--max-request-bytes", "0"], "--max-request-bytes"),
    (["serve", "--config", "{tmp}/serve.yaml"], ("max_batch_size", "nan")),
    (_EVAL + ["--batch-size", "0"], "--batch-size"),
    (_EVAL + ["--window", "-1"], "--window"),
    (_EVAL + ["--limit", "-3"], "--limit"),
    (_EVAL + ["--device", "quantum"], "--device"),
    (["eval", "--config", "{tmp}/eval.yaml"], ("batch_size", "inf")),
    (["convert", "--checkpoint", "{tmp}/ckpt", "--out", "{tmp}/hf", "--dtype", "nan"], "--dtype"),
    (["prepare", "--output", "{tmp}/ds", "--val-fraction", "nan"], "--val-fraction"),
    (["prepare", "--output", "{tmp}/ds", "--val-fraction", "inf"], "--val-fraction"),
    (["prepare", "--output", "{tmp}/ds", "--workers", "0"], "--workers"),
    (["prepare", "--output", "{tmp}/ds", "--shard-tokens", "-1"], "--shard-tokens"),
    (["prepare", "--output", "{tmp}/ds", "--num-shards", "0"], "--num-shards"),
    (_PRETRAIN + ["--optim.lr", "nan"], "'lr'"),
    (_PRETRAIN + ["--optim.lr", "inf"], "'lr'"),
    (_PRETRAIN + ["--optim.weight_decay", "nan"], "'weight_decay'"),
    (_PRETRAIN + ["--optim.grad_clip", "nan"], "'grad_clip'"),
    (_PRETRAIN + ["--optim.eps", "-1"], "'eps'"),
    (_PRETRAIN + ["--optim.betas", "[0.9, .nan]"], ("'betas'", "nan")),
    (_PRETRAIN + ["--optim.min_lr", "nan"], "'min_lr'"),
    (_PRETRAIN + ["--train.micro_batch", "-1"], "train.micro_batch"),
    (_PRETRAIN + ["--train.peak_tflops", "nan"], "'peak_tflops'"),
    (_PRETRAIN + ["--train.device", "quantum"], "train.device"),
    (_PRETRAIN + ["--model.norm_eps", "inf"], "'norm_eps'"),
    (_PRETRAIN + ["--model.rope_theta", "nan"], "'rope_theta'"),
    (_PRETRAIN + ["--data.vocab_size", "-1"], "'vocab_size'"),
    (_SFT + ["--optim.lr", "nan"], "'lr'"),
    (_SFT + ["--optim.weight_decay", "inf"], "'weight_decay'"),
    (_SFT + ["--train.epochs", "nan"], "train.epochs"),
    (_SFT + ["--train.micro_batch", "-1"], "train.micro_batch"),
    (_SFT + ["--max-steps", "-1"], "train.max_steps"),
    (_SFT + ["--data.val_fraction", "nan"], "data.val_fraction"),
    (_SFT + ["--lora", "--lora.alpha", "inf"], "'alpha'"),
    (_SFT + ["--lora", "--lora.dropout", "nan"], "'dropout'"),
    (_DPO + ["--beta", "inf"], "dpo.beta"),
    (_DPO + ["--beta", "nan"], "dpo.beta"),
    (_DPO + ["--dpo.label_smoothing", "nan"], "dpo.label_smoothing"),
    (_BENCH_TRAIN + ["--steps", "-1"], "--steps"),
    (_BENCH_TRAIN + ["--peak-tflops", "nan"], "--peak-tflops"),
    (_BENCH_TRAIN + ["--device", "quantum"], "--device"),
    (_BENCH_GEN + ["--time-budget", "nan"], "--time-budget"),
    (_BENCH_GEN + ["--threads", "0"], "--threads"),
    (["bench", "generate", "--batch-sizes", "1,-8"], "--batch-sizes"),
    (["bench", "data", "--batches", "-1"], "--batches"),
    (["bench", "data", "--loader-workers", "0,nan"], "--loader-workers"),
    (["bench", "eval", "--skip-lm-eval", "--items", "0"], "--items"),
    (["bench", "gguf", "--tokens", "-1"], "--tokens"),
    (["bench", "quantize", "--train-steps", "-1"], "--train-steps"),
]


@pytest.mark.parametrize("argv, needle", BAD_VALUES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_VALUES])
def test_bad_number_or_device_is_one_error_line_naming_it(argv, needle, tmp_path, capsys):
    (tmp_path / "serve.yaml").write_text("random_preset: tinyllama-tiny\nmax_batch_size: .nan\n")
    (tmp_path / "eval.yaml").write_text("random_preset: tinyllama-tiny\nperplexity: [x.txt]\nbatch_size: .inf\n")
    rc, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2, err
    # the flag or field, and the bad value (the last argument, unless it came from a --config file)
    needles = needle if isinstance(needle, tuple) else (needle, argv[-1])
    _assert_one_line_error(rc, err, "error:", *needles)


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x"], ["chat"], ["serve"], ["eval", "--perplexity", "x.txt"], ["sft", "--data", "x.jsonl"],
    ["dpo", "--data", "x.jsonl"],
])
@pytest.mark.parametrize("what", ["gguf", "run"])
def test_model_that_is_not_a_hugging_face_directory_says_how_to_get_one(command, what, tmp_path, capsys):
    if what == "gguf":
        model = tmp_path / "m.gguf"
        model.write_bytes(b"GGUF")
    else:  # a pretraining run directory
        model = tmp_path / "run"
        (model / "checkpoints").mkdir(parents=True)
    rc, _, err = run_cli(command[:1] + ["--model", str(model)] + command[1:], capsys)
    _assert_one_line_error(rc, err, f"--model {model}", "Hugging Face model directory", "tinyllama convert --checkpoint")
    assert rc == 2
