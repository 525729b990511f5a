"""Stopping a run the way launchers do: SIGTERM/SIGINT to the whole process group (`timeout`, SLURM,
Ctrl-C), DataLoader workers included, under torchrun too; a second Ctrl-C; then exact resume.

Every run here is a real `python -m tinyllama ...` process in its own session, signalled with killpg.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tinyllama.train.checkpoint import find_latest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A prepared token dataset (so the mixture loader runs with DataLoader workers)."""
    from tinyllama.data.prepare import write_token_dataset

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 512, size=int(rng.integers(50, 400))).tolist() for _ in range(300)]
    path = tmp_path_factory.mktemp("signals") / "ds"
    write_token_dataset(path, {"train": docs, "val": docs[:30]}, vocab_size=512)
    return path


def _run_file(tmp_path: Path, dataset: Path, out: Path, max_steps: int, **train) -> Path:
    t = {"out_dir": str(out), "micro_batch": 2, "global_batch": 4, "max_steps": max_steps, "eval_every": 0,
         "eval_blocks": 4, "save_every": 0, "log_every": 1, "device": "cpu", "progress": True, "tensorboard": False}
    t.update(train)
    run = {"model": {"preset": "tinyllama-tiny", "vocab_size": 512},
           "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 40},
           "data": {"sources": str(dataset), "seq_len": 32, "num_workers": 2, "seed": 7},
           "train": t}
    path = tmp_path / f"{out.name}-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def _steps(out: Path) -> int:
    f = out / "metrics.jsonl"
    return sum(1 for line in f.read_text().splitlines() if '"train"' in line) if f.exists() else 0


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _steps(out) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "run made no progress"
        time.sleep(0.05)


def _assert_clean_checkpoint(out: Path, world_size: int = 1) -> Path:
    latest = find_latest(out / "checkpoints")
    assert latest is not None
    assert not list((out / "checkpoints").glob("*.tmp")), "a half-written checkpoint was left behind"
    meta = json.loads((latest / "meta.json").read_text())
    assert latest.name == f"step-{meta['step']:07d}" == f"step-{_steps(out):07d}"
    # every rank wrote its shard and its RNG state of that same step
    assert sorted(p.name for p in latest.glob("__*_0.distcp")) == [f"__{r}_0.distcp" for r in range(world_size)]
    assert sorted(p.name for p in (latest / "rng").iterdir()) == [f"rank-{r:05d}.pt" for r in range(world_size)]
    return latest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_process_group_with_loader_workers_checkpoints_and_resumes_bitwise(tmp_path, dataset, sig):
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "tinyllama", "pretrain", "--config",
                   str(_run_file(tmp_path, dataset, out, 10_000))])
    _wait_for_steps(proc, out, 3)
    os.killpg(proc.pid, sig)  # the main process, its DataLoader workers, everything in the group
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert f"{sig.name} received: checkpoint written, exiting" in output
    assert "Traceback" not in output and "killed by signal" not in output
    stopped = int(_assert_clean_checkpoint(out).name.split("-")[1])
    if sig == signal.SIGINT:
        return  # the resume below is the same for either signal
    # --resume continues exactly as an uninterrupted run would
    total = stopped + 3
    resumed = subprocess.run([sys.executable, "-m", "tinyllama", "pretrain", "--resume", "--config",
                              str(_run_file(tmp_path, dataset, out, total))], env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run([sys.executable, "-m", "tinyllama", "pretrain", "--config",
                               str(_run_file(tmp_path, dataset, tmp_path / "straight", total))], env=_env(),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _losses(out) == _losses(tmp_path / "straight")  # bitwise (bf16 where auto picks it)


def test_second_ctrl_c_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path, dataset):
    # Steps of several seconds (5 s on the 2-core dev machine, longer on slower ones), so both Ctrl-Cs 1.5 s
    # apart land inside one step; at 64 sequences a step took 1.2 s there and the run had already exited.
    out = tmp_path / "run"
    cfg = _run_file(tmp_path, dataset, out, 10_000, micro_batch=8, global_batch=256, save_every=1)
    text = yaml.safe_load(cfg.read_text())
    text["model"] = {"preset": "tinyllama-demo", "vocab_size": 512}
    text["data"]["seq_len"] = 128
    text["train"]["dtype"] = "float32"  # bf16 (auto on an AVX512-BF16 CPU) makes the steps too short for the test
    cfg.write_text(yaml.safe_dump(text))
    proc = _start([sys.executable, "-m", "tinyllama", "pretrain", "--config", str(cfg)])
    _wait_for_steps(proc, out, 2, timeout=300)
    before = _steps(out)
    while _steps(out) == before:  # right after a step ends: the next one has just begun
        assert proc.poll() is None
        time.sleep(0.01)
    kept = find_latest(out / "checkpoints")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)  # past the window in which a repeat counts as the same request
    assert proc.poll() is None, "the step should still be running"
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    output, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 20
    assert proc.returncode == 130, output[-3000:]
    assert output.strip().splitlines()[-1] == "interrupted" and "Traceback" not in output
    assert not list((out / "checkpoints").glob("*.tmp"))
    latest = find_latest(out / "checkpoints")
    assert latest is not None and latest.name >= kept.name
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] <= _steps(out)
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama
    from tinyllama.train.checkpoint import load_model_weights

    load_model_weights(latest, Llama(ModelConfig.from_name("tinyllama-demo", vocab_size=512)))  # intact


def test_second_ctrl_c_inside_a_checkpoint_write_stops_as_interrupted(tmp_path, monkeypatch):
    """A second Ctrl-C that lands while DCP writes a checkpoint: DCP wraps the KeyboardInterrupt in a
    CheckpointException. The run must still stop as interrupted (exit 130 at the CLI), remove the half-written
    `.tmp` and keep the previous checkpoint. CI once saw exit 1 and a traceback from exactly this."""
    from torch.distributed.checkpoint import filesystem

    from tinyllama.train import checkpoint as checkpoint_mod
    from tinyllama.train.config import run_config_from_dict
    from tinyllama.train.loop import StopRequest
    from tinyllama.train.trainer import pretrain

    monkeypatch.setattr(StopRequest, "repeat_window_s", -1.0)  # the second SIGINT counts as a second Ctrl-C
    real_save, real_write = checkpoint_mod.dcp.save, filesystem._write_item
    saves, fired = [], []

    def save(*args, **kwargs):
        saves.append(kwargs.get("checkpoint_id"))
        return real_save(*args, **kwargs)

    def write_item(*args, **kwargs):
        if len(saves) == 2 and not fired:  # inside the second checkpoint's write
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: finish the step, checkpoint, exit
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: stop at once
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.dcp, "save", save)
    monkeypatch.setattr(filesystem, "_write_item", write_item)
    out = tmp_path / "run"
    run = {"model": {"preset": "tinyllama-tiny", "vocab_size": 512},
           "optim": {"lr": 3e-3, "warmup_steps": 1, "max_steps": 10},
           "data": {"sources": "synthetic", "seq_len": 32, "vocab_size": 512, "seed": 5},
           "train": {"out_dir": str(out), "micro_batch": 2, "global_batch": 2, "max_steps": 10, "save_every": 2,
                     "eval_every": 0, "log_every": 1, "device": "cpu", "progress": False, "tensorboard": False,
                     "dtype": "float32", "save_final": False}}
    with pytest.raises(KeyboardInterrupt):
        pretrain(run_config_from_dict(run))
    assert fired and saves[1].endswith("step-0000004.tmp")
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert find_latest(out / "checkpoints").name == "step-0000002"


def test_only_errors_that_come_from_the_second_ctrl_c_count_as_it():
    from torch.distributed.checkpoint.api import CheckpointException

    from tinyllama.train.loop import _caused_by_interrupt

    assert _caused_by_interrupt(KeyboardInterrupt())
    assert _caused_by_interrupt(CheckpointException("save", {0: (KeyboardInterrupt(), None)}))
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 393 vs 337")  # what torch.save's zip writer raised meanwhile
    except RuntimeError as e:
        assert _caused_by_interrupt(e)
    assert not _caused_by_interrupt(RuntimeError("a real failure, later"))  # stays itself, with its traceback
    assert not _caused_by_interrupt(CheckpointException("save", {0: (OSError("disk full"), None)}))


@pytest.mark.slow
def test_torchrun_two_ranks_sigterm_to_the_group_and_to_the_ranks(tmp_path, dataset):
    """gloo, 2 ranks: SIGTERM to every process of the group (torchrun forwards it again) and SIGTERM to the
    ranks only: each time both ranks checkpoint the same step and exit 0; --resume continues bitwise."""
    import psutil

    out = tmp_path / "run"
    proc = _start(TORCHRUN + ["-m", "tinyllama", "pretrain", "--config", str(_run_file(tmp_path, dataset, out, 10_000))])
    _wait_for_steps(proc, out, 3, timeout=180)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    # torchrun itself exits with the signal it was sent; the ranks under it exit 0 with a checkpoint
    assert "SIGTERM received: checkpoint written, exiting" in output, output[-3000:]
    assert "ChildFailedError" not in output and "killed by signal" not in output
    stopped = int(_assert_clean_checkpoint(out, world_size=2).name.split("-")[1])

    # SIGTERM to the two ranks only (the launcher is left alone): torchrun sees both exit 0 and exits 0
    proc = _start(TORCHRUN + ["-m", "tinyllama", "pretrain", "--resume", "--config",
                              str(_run_file(tmp_path, dataset, out, 10_000))])
    _wait_for_steps(proc, out, stopped + 2, timeout=180)
    ranks = [c for c in psutil.Process(proc.pid).children() if "tinyllama" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    for r in ranks:
        r.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    stopped = int(_assert_clean_checkpoint(out, world_size=2).name.split("-")[1])

    total = stopped + 2
    resumed = subprocess.run(TORCHRUN + ["-m", "tinyllama", "pretrain", "--resume", "--config",
                                         str(_run_file(tmp_path, dataset, out, total))],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(TORCHRUN + ["-m", "tinyllama", "pretrain", "--config",
                                          str(_run_file(tmp_path, dataset, tmp_path / "straight", total))],
                              env=_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _losses(out) == _losses(tmp_path / "straight")
    assert torch.distributed.is_available()
