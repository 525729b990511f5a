"""FSDP2 on CPU (gloo): 2 processes match 1 with the same global batch, and a 2-process run resumes on 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml

from test_train import REPO, losses_of, tiny_run  # noqa: F401  (shared run recipe)
from tinyllama.train.config import run_config_from_dict
from tinyllama.train.trainer import pretrain

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _torchrun(tmp_path, run: dict, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"run-{nproc}.yaml"
    cfg.write_text(yaml.safe_dump(run))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tinyllama", "pretrain", "--config", str(cfg), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 20 steps of 8 sequences (micro 4 × 2 accumulation)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single")
    return pretrain(run_config_from_dict(tiny_run(out, micro_batch=4, global_batch=8)))["losses"]


def test_fsdp2_two_processes_match_one_and_resume_on_one(tmp_path, reference):
    ref = reference
    # Two processes, FSDP2, same global batch (micro 4 × 2 ranks × 1 accumulation), stopped at step 10.
    run2 = tiny_run(tmp_path / "fsdp", micro_batch=4, global_batch=8, max_steps=10, progress=True)
    out = _torchrun(tmp_path, run2, 2)
    assert "(FSDP2)" in out.stderr + out.stdout
    two = losses_of(tmp_path / "fsdp")
    assert sorted(two) == list(range(1, 11))
    for step, loss in two.items():
        assert loss == pytest.approx(ref[step - 1], rel=1e-5), step
    # Resume the 2-process checkpoint in 1 process (resharding), continue to 20: still the same curve.
    resumed = pretrain(run_config_from_dict(tiny_run(tmp_path / "fsdp", micro_batch=4, global_batch=8)), resume=True)
    assert resumed["resumed_from"].endswith("step-0000010")
    assert resumed["losses"] == pytest.approx(ref[10:], rel=1e-5)


def test_hsdp_replicate_across_nodes_matches_one(tmp_path, reference):
    # Two "nodes" of one process each: a 2-D (replicate=2, shard=1) mesh, as across real nodes.
    run = tiny_run(tmp_path / "hsdp", micro_batch=4, global_batch=8, max_steps=6, hsdp_replicas=2)
    _torchrun(tmp_path, run, 2)
    got = losses_of(tmp_path / "hsdp")
    assert sorted(got) == list(range(1, 7))
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step - 1], rel=1e-5), step


def test_fsdp2_fused_optimizer_step_on_device_matches_one(tmp_path, reference):
    # Fused AdamW clips (grad_scale) and skips (found_inf) on the device next to DTensor parameters; with
    # the blocks' weights kept gathered between forward and backward (fsdp_reshard_after_forward: false).
    run = tiny_run(tmp_path / "fused", micro_batch=4, global_batch=8, max_steps=6, fsdp_reshard_after_forward=False)
    run["optim"]["fused"] = True
    _torchrun(tmp_path, run, 2)
    got = losses_of(tmp_path / "fused")
    assert sorted(got) == list(range(1, 7))
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step - 1], rel=2e-5), step


def test_fsdp2_with_the_fused_blocks_matches_one(tmp_path, reference):
    # The fused training blocks (their reference maths on the CPU) under FSDP2, weights resharded after
    # forward and gathered again for backward: the same curve as one process of the plain model.
    run = tiny_run(tmp_path / "fusedblk", micro_batch=4, global_batch=8, max_steps=6, progress=True)
    run["train"]["fast_kernels"] = True
    run["train"]["kernels"] = {"fused_blocks": True}
    out = _torchrun(tmp_path, run, 2)
    assert "(FSDP2)" in out.stderr + out.stdout
    assert "returned a view tensor" not in out.stderr  # FSDP2 hooks a block's output: it must not be a view
    got = losses_of(tmp_path / "fusedblk")
    assert sorted(got) == list(range(1, 7))
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step - 1], rel=1e-4), step


def test_fsdp2_bf16_weights_fused_blocks_match_plain(tmp_path):
    # bf16 FSDP2 mixed precision hands the fused blocks bf16 weights (re-stacked in backward, bf16 weight
    # gradients): same curve as the plain blocks under the same policy, to bf16 rounding.
    losses = {}
    for name in ("plain", "fused"):
        run = tiny_run(tmp_path / name, micro_batch=4, global_batch=8, max_steps=6)
        run["train"]["dtype"] = "bfloat16"
        if name == "fused":
            run["train"]["fast_kernels"] = True
            run["train"]["kernels"] = {"fused_blocks": True}
        _torchrun(tmp_path, run, 2)
        losses[name] = losses_of(tmp_path / name)
    assert sorted(losses["fused"]) == list(range(1, 7))
    for step, loss in losses["fused"].items():
        assert loss == pytest.approx(losses["plain"][step], rel=2e-3), step


def test_two_ranks_record_every_ranks_files_and_resume_past_a_damaged_one(tmp_path):
    # Rank 0 writes the record after every rank wrote its shard; a damaged shard of rank 1 is found on resume
    # (rank 0 decides, every rank loads the same earlier checkpoint) and reported once.
    import json

    run = tiny_run(tmp_path / "run", micro_batch=2, global_batch=4, max_steps=4, save_every=2, progress=True)
    _torchrun(tmp_path, run, 2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000004"
    recorded = set(json.loads((ckpt / "integrity.json").read_text())["files"])
    assert {"__0_0.distcp", "__1_0.distcp", "rng/rank-00000.pt", "rng/rank-00001.pt", ".metadata"} <= recorded
    shard = ckpt / "__1_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    run["train"]["max_steps"] = 6
    out = _torchrun(tmp_path, run, 2, "--resume")
    log = out.stdout + out.stderr
    assert log.count("warning: checkpoint step-0000004 is damaged: __1_0.distcp is truncated") == 1, log[-3000:]
    assert "resumed from" in log and "step-0000002 (step 2" in log
    assert sorted(losses_of(tmp_path / "run")) == list(range(1, 7))
