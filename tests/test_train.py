"""Pretraining loop on CPU: exact resume, fault handling (SIGTERM, kill -9), non-finite policy, OOM advice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.model import Llama, RMSNorm
from tinyllama.train import trainer as trainer_mod
from tinyllama.train.checkpoint import find_latest, list_checkpoints, load_model_weights
from tinyllama.train.config import run_config_from_dict
from tinyllama.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]


def tiny_run(out_dir, **train) -> dict:
    """A run dict: tiny GQA model, synthetic tokens, fp32 CPU. vocab 512 keeps steps fast."""
    t = {"out_dir": str(out_dir), "micro_batch": 2, "global_batch": 4, "max_steps": 20, "eval_every": 0,
         "eval_blocks": 4, "save_every": 0, "log_every": 5, "device": "cpu", "progress": False,
         "tensorboard": False, "dtype": "float32"}
    t.update(train)
    return {
        "model": {"preset": "tinyllama-tiny", "vocab_size": 512},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 20},
        "data": {"sources": "synthetic", "seq_len": 32, "vocab_size": 512, "seed": 5},
        "train": t,
    }


def final_weights(out_dir) -> dict:
    model = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512))
    load_model_weights(out_dir, model)
    return model.state_dict()


def losses_of(out_dir) -> dict[int, float]:
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a shared 2-core box
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: autocast on CPU, what `auto` picks on AVX512-BF16
def test_exact_resume_bitwise(tmp_path, dtype):
    straight = pretrain(run_config_from_dict(tiny_run(tmp_path / "a", dtype=dtype)))
    # 10 steps (writes its final checkpoint), then a new process-equivalent run resumes to 20.
    first = pretrain(run_config_from_dict(tiny_run(tmp_path / "b", max_steps=10, dtype=dtype)))
    second = pretrain(run_config_from_dict(tiny_run(tmp_path / "b", max_steps=20, dtype=dtype)), resume=True)
    assert second["resumed_from"].endswith("step-0000010")
    assert first["losses"] + second["losses"] == straight["losses"]  # bitwise
    assert straight["losses"][-1] < straight["losses"][0]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.jsonl of the resumed run has each step once
    recs = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 21))


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=2)))
    with pytest.raises(TinyLlamaError, match="--resume"):
        pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=2)))


def test_retention_keeps_last_n_and_every_mth(tmp_path):
    pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=12, save_every=2, keep_last=2, keep_every=4)))
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [4, 8, 10, 12]
    assert find_latest(tmp_path / "checkpoints").name == "step-0000012"


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    a = pretrain(run_config_from_dict(tiny_run(tmp_path / "a", max_steps=5, micro_batch=4)))
    b = pretrain(run_config_from_dict(tiny_run(tmp_path / "b", max_steps=5, micro_batch=1)))
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)


class _NaNAt(Llama):
    """A model whose loss is NaN on chosen forward calls (to exercise the non-finite policy)."""

    nan_calls: set = set()
    calls = 0

    def forward(self, ids, targets=None, **kw):
        out = super().forward(ids, targets, **kw)
        if targets is not None and self.training:
            type(self).calls += 1
            if type(self).calls in self.nan_calls:
                return out[0], out[1] * float("nan")
        return out


def fused_run(out_dir, fused: bool, **train) -> dict:
    run = tiny_run(out_dir, **train)
    run["optim"]["fused"] = fused
    return run


class _Float64Llama(Llama):
    """Llama with its loss in the weights' dtype (the library's is fp32 even for float64 weights)."""

    def forward(self, ids, targets=None, **kw):
        if targets is None:
            return super().forward(ids, **kw)
        logits = super().forward(ids, **kw)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@pytest.fixture
def float64_training(monkeypatch):
    """pretrain() in float64 end to end (weights, activations, norms, loss, AdamW state).

    Fused AdamW (grad / clip factor inside the kernel) and clip-then-step (grad * (1 / factor), then the
    for-each AdamW) round differently, and in fp32 that is not a bounded difference: Adam maps a gradient g
    to about g / (|g| + eps), so an element whose gradient is near eps (1e-8) -- an embedding row of a token
    seen once, whose gradient is a cancellation among terms ~1e-2 -- turns a one-ulp change of the weights
    in the previous step into an O(1) change of its update (a few % of lr). Which elements land there
    depends on the CPU's kernels (AVX2/AVX-512 blocking, reduction order), so an fp32 comparison passes on
    one machine and fails on another. In float64 the rounding noise is 1e-9 of that, and what is left is
    the fused kernel's fp32 clip factor (its grad_scale input is fp32: <= 2^-24 relative, the same on every
    machine): ~5e-8 after 8 steps, against ~7e-6 for a clip factor off by 1 %.
    """
    monkeypatch.setattr(RMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(trainer_mod, "Llama", _Float64Llama)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _max_abs_diff(wa: dict, wb: dict) -> float:
    assert wa.keys() == wb.keys() and all(v.dtype == torch.float64 for v in wa.values())
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_fused_optimizer_clips_and_steps_on_device_like_clip_then_step(tmp_path, float64_training):
    # The fused path divides by the clip factor inside AdamW (grad_scale) and syncs after the step; the
    # for-each path clips the gradients, syncs, then steps. A small clip keeps clipping active every step.
    a = pretrain(run_config_from_dict(fused_run(tmp_path / "a", False, max_steps=8)))
    b = pretrain(run_config_from_dict(fused_run(tmp_path / "b", True, max_steps=8)))
    a_norms = [r["grad_norm"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    assert min(a_norms) > 1.0  # grad_clip 1.0 was active on every step
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)
    wa = final_weights(tmp_path / "a")
    assert _max_abs_diff(wa, final_weights(tmp_path / "b")) < 1e-6
    # The bound tells a clip factor 1 % off (the fused run clipping to 1.01) from the right one.
    wrong = fused_run(tmp_path / "c", True, max_steps=8)
    wrong["optim"]["grad_clip"] = 1.01
    pretrain(run_config_from_dict(wrong))
    assert _max_abs_diff(wa, final_weights(tmp_path / "c")) > 2e-6


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_nonfinite_skip_policy_skips_and_counts(tmp_path, monkeypatch, fused):
    monkeypatch.setattr(trainer_mod, "Llama", _NaNAt)
    _NaNAt.calls, _NaNAt.nan_calls = 0, {3 * 2 - 1}  # a micro-batch of step 3 (2 micro-batches per step)
    r = pretrain(run_config_from_dict(fused_run(tmp_path, fused, max_steps=6, micro_batch=2, global_batch=4)))
    assert r["skipped_steps"] == 1 and r["step"] == 6 and r["stopped_by"] is None
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if x.get("skipped")] == [3]
    # and the weights stayed finite
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())


class _NaNLossOnly(_Float64Llama):
    """NaN loss value with finite gradients (a NaN constant added to the loss) on chosen forward calls."""

    nan_calls: set = set()
    calls = 0

    def forward(self, ids, targets=None, **kw):
        out = super().forward(ids, targets, **kw)
        if targets is not None and self.training:
            type(self).calls += 1
            if type(self).calls in self.nan_calls:
                return out[0], out[1] + torch.tensor(float("nan"))
        return out


def test_nan_loss_with_finite_gradients_is_skipped_by_fused_step_too(tmp_path, monkeypatch, float64_training):
    monkeypatch.setattr(trainer_mod, "Llama", _NaNLossOnly)
    weights = {}
    for fused in (False, True):
        _NaNLossOnly.calls, _NaNLossOnly.nan_calls = 0, {3 * 2 - 1}
        r = pretrain(run_config_from_dict(fused_run(tmp_path / str(fused), fused, max_steps=5)))
        assert r["skipped_steps"] == 1
        weights[fused] = final_weights(tmp_path / str(fused))
    # both paths skipped the same step (a fused step taken on finite gradients would move the weights by ~lr)
    assert _max_abs_diff(weights[False], weights[True]) < 1e-6


def test_nonfinite_stop_policy_checkpoints_then_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "Llama", _NaNAt)
    _NaNAt.calls, _NaNAt.nan_calls = 0, {4 * 2}
    r = pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=20, nonfinite_policy="stop")))
    assert r["stopped_by"] == "nonfinite" and r["step"] == 4
    assert find_latest(tmp_path / "checkpoints").name == "step-0000004"


def test_too_many_consecutive_nonfinite_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "Llama", _NaNAt)
    _NaNAt.calls, _NaNAt.nan_calls = 0, set(range(1, 100))
    r = pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=20, max_consecutive_nonfinite=2)))
    assert r["stopped_by"] == "nonfinite" and r["step"] == 3 and r["skipped_steps"] == 3


def test_oom_prints_advice(tmp_path, monkeypatch):
    class _OOM(Llama):
        def forward(self, *a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_mod, "Llama", _OOM)
    with pytest.raises(TinyLlamaError, match="micro_batch.*activation_checkpointing"):
        pretrain(run_config_from_dict(tiny_run(tmp_path)))


# ---- real processes: signals ------------------------------------------------------------------------
def _write_cfg(path: Path, run: dict) -> Path:
    path.write_text(yaml.safe_dump(run))
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_steps(out_dir) -> int:
    f = Path(out_dir) / "metrics.jsonl"
    if not f.exists():
        return 0
    return sum(1 for l in f.read_text().splitlines() if '"train"' in l)


def test_sigterm_finishes_step_checkpoints_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    run = tiny_run(out, max_steps=100000, log_every=1, progress=True)
    run["optim"]["max_steps"] = 100000
    cfg = _write_cfg(tmp_path / "run.yaml", run)
    proc = subprocess.Popen([sys.executable, "-m", "tinyllama", "pretrain", "--config", str(cfg)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while _train_steps(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "SIGTERM received: checkpoint written" in output
    stopped_at = _train_steps(out)
    latest = find_latest(out / "checkpoints")
    assert latest is not None and latest.name == f"step-{stopped_at:07d}"
    # resume picks up exactly there
    r = pretrain(run_config_from_dict(tiny_run(out, max_steps=stopped_at + 2, progress=False)), resume=True)
    assert r["resumed_from"] == str(latest) and r["step"] == stopped_at + 2


def test_kill9_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    # A 32k vocabulary makes each checkpoint ~50 MB, so writes take long enough to be interrupted.
    run = tiny_run(out, max_steps=400, save_every=2, keep_last=3, log_every=1)
    run["model"]["vocab_size"] = run["data"]["vocab_size"] = 32000
    run["optim"]["max_steps"] = 400
    cfg = _write_cfg(tmp_path / "run.yaml", run)
    proc = subprocess.Popen([sys.executable, "-m", "tinyllama", "pretrain", "--config", str(cfg)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    killed_during_write = False
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            # Complete checkpoints first, then temp folders: a .tmp seen after a complete one exists is a later
            # step's write (listed the other way round, the first write can finish in between: a flaky test).
            if ckpts.exists() and list_checkpoints(ckpts) and list(ckpts.glob("step-*.tmp")):
                proc.kill()  # SIGKILL while a checkpoint is being written
                killed_during_write = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_during_write, "never caught a checkpoint mid-write"
    before = losses_of(out)  # losses the killed run logged
    latest = find_latest(ckpts)
    assert latest is not None
    resume_step = int(latest.name.split("-")[1])
    assert max(before) - resume_step <= 2 + 1  # at most the steps since the last checkpoint are lost
    r = pretrain(run_config_from_dict({**run, "train": {**run["train"], "max_steps": resume_step + 3}}), resume=True)
    assert r["resumed_from"] == str(latest)
    assert not list(ckpts.glob("step-*.tmp"))  # the torn write was cleaned up
    # The resumed run retraces an uninterrupted one exactly, and the killed one where that logged the steps
    # (the kill can land before the step after the checkpoint is logged).
    after = losses_of(out)
    ref_out = tmp_path / "reference"
    pretrain(run_config_from_dict({**run, "train": {**run["train"], "out_dir": str(ref_out),
                                                    "max_steps": resume_step + 3}}))
    reference = losses_of(ref_out)
    resumed = sorted(s for s in after if s > resume_step)
    assert resumed == [resume_step + 1, resume_step + 2, resume_step + 3]
    assert all(after[s] == reference[s] for s in resumed)
    assert all(after[s] == before[s] for s in before if s in after)


def test_default_command_runs_the_demo_end_to_end(tmp_path, capsys):
    """`tinyllama pretrain` (the demo recipe) on a tiny preset: prepares the corpus, trains, validates,
    checkpoints, exports a Hugging Face directory, reports the unigram entropy and prints a sample."""
    from tinyllama.cli import main

    out, data = tmp_path / "demo", tmp_path / "data"
    rc = main(["pretrain", "--out", str(out), "--train.data_root", str(data), "--model.preset", "tinyllama-tiny",
               "--data.seq_len", "64", "--train.max_steps", "4", "--train.global_batch", "4",
               "--train.micro_batch", "4", "--train.eval_every", "2", "--train.eval_blocks", "8",
               "--train.save_every", "2", "--train.sample_tokens", "5", "--train.tensorboard", "false"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "validation at step 2" in err and "validation at step 4" in err
    assert "unigram entropy of the training tokens" in err and "sample (greedy): Call me Ishmael" in err
    assert find_latest(out / "checkpoints").name == "step-0000004"
    model = Llama.from_pretrained(out / "hf")
    assert model.config.n_layers == 2 and (out / "hf" / "tokenizer.json").is_file()
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


def test_init_from_starts_a_new_stage_from_previous_weights(tmp_path):
    from tinyllama.train.synthetic import SyntheticLoader

    pretrain(run_config_from_dict(tiny_run(tmp_path / "stage1", max_steps=4)))
    stage2 = tiny_run(tmp_path / "stage2", max_steps=1, init_from=str(tmp_path / "stage1"), global_batch=2)
    r = pretrain(run_config_from_dict(stage2))
    assert r["step"] == 1  # a new run: step, schedule and data start over
    prev = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512))
    load_model_weights(tmp_path / "stage1", prev)
    batch = next(SyntheticLoader(512, 32, 2, seed=5))
    with torch.no_grad():
        _, loss = prev(batch[:, :-1], batch[:, 1:])
    assert r["losses"][0] == pytest.approx(loss.item(), rel=1e-6)


def test_resume_with_a_different_model_is_refused(tmp_path):
    pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=2)))
    run = tiny_run(tmp_path, max_steps=4)
    run["model"]["n_layers"] = 1
    with pytest.raises(TinyLlamaError, match="n_layers: checkpoint 2 vs config 1"):
        pretrain(run_config_from_dict(run), resume=True)


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=2, tensorboard=True)))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_async_checkpoint_is_published_only_when_complete(tmp_path):
    from tinyllama.train.checkpoint import CheckpointManager
    from tinyllama.train.distributed import DistInfo
    from tinyllama.train.optim import OptimConfig, build_optimizer

    model = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512))
    opt = build_optimizer(model, OptimConfig(max_steps=3))
    ids = torch.randint(0, 512, (2, 9))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    opt.step()
    mgr = CheckpointManager(tmp_path, DistInfo(), use_async=True)
    mgr.save(1, model, opt, {"trainer": {}, "loader": {}}, {"step": 1, "model": model.config.to_dict()})
    if mgr._pending is not None:  # in flight: nothing published yet
        assert find_latest(tmp_path / "checkpoints") is None or mgr._pending[0].done()
    mgr.wait()
    assert find_latest(tmp_path / "checkpoints").name == "step-0000001"
    fresh = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512))
    load_model_weights(tmp_path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_profile_window_writes_trace_and_table(tmp_path):
    run = tiny_run(tmp_path / "prof", max_steps=5, profile_from_step=2, profile_steps=2, save_final=False)
    pretrain(run_config_from_dict(run))
    prof = tmp_path / "prof" / "profile"
    assert sorted(p.name for p in prof.iterdir()) == ["rank0_steps3-4.json", "rank0_steps3-4.txt"]
    trace = json.loads((prof / "rank0_steps3-4.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert "Self CPU" in (prof / "rank0_steps3-4.txt").read_text()


def test_profile_settings_validated():
    with pytest.raises(TinyLlamaError, match="profile_from_step"):
        run_config_from_dict(tiny_run("x", profile_from_step=-1)).validate()
    with pytest.raises(TinyLlamaError, match="profile_steps"):
        run_config_from_dict(tiny_run("x", profile_steps=0)).validate()


def test_export_hf_replaces_its_own_export_and_keeps_other_files(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "notes.txt").write_text("precious\n")  # the user's file in the export directory
    pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=2, export_hf="hf")))
    first = (hf / "model.safetensors").read_bytes()
    # a re-run (resumed to more steps) exports again into the same directory
    pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=4, export_hf="hf")), resume=True)
    assert (hf / "model.safetensors").read_bytes() != first
    assert (hf / "notes.txt").read_text() == "precious\n"
    got = Llama.from_pretrained(hf)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in final_weights(tmp_path).items())


def test_validation_is_reported_per_source_and_overall(tmp_path):
    """Two prepared sources: validation gives each one's loss and their token-weighted mean."""
    import numpy as np

    from tinyllama.data.prepare import write_token_dataset

    rng = np.random.default_rng(0)
    for name, hi in (("wide", 512), ("narrow", 40)):  # narrow: 37 distinct tokens, far easier to predict
        docs = [rng.integers(3, hi, size=int(rng.integers(60, 300))).tolist() for _ in range(80)]
        write_token_dataset(tmp_path / name, {"train": docs, "val": docs[:20]}, vocab_size=512)
    run = tiny_run(tmp_path / "run", max_steps=30, eval_blocks=8)
    run["data"] = {"sources": f"{tmp_path / 'wide'}:0.5,{tmp_path / 'narrow'}:0.5", "seq_len": 32}
    r = pretrain(run_config_from_dict(run))
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"val"' in line][-1]
    assert val["val_loss_narrow"] < val["val_loss_wide"] - 0.5
    assert val["val_tokens"] == 8 * 32  # eval_blocks split evenly: 4 blocks of each source
    assert val["val_loss"] == pytest.approx((val["val_loss_narrow"] + val["val_loss_wide"]) / 2, rel=1e-9)
    assert r["val_loss"] == val["val_loss"]


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from tinyllama.train import loop

    cpu = torch.device("cpu")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if "avx512f" in flags:  # x86 Linux: the flags say what the CPU has
        assert loop.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.resolve_compute_dtype("auto", cpu) == torch.bfloat16
    assert loop.resolve_compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert loop.resolve_compute_dtype("auto", cpu) == torch.float32
    assert loop.resolve_compute_dtype("bf16", cpu) == torch.bfloat16  # an explicit choice is kept
    assert loop.resolve_compute_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(TinyLlamaError, match="train.dtype"):
        loop.resolve_compute_dtype("half", cpu)
