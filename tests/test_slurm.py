"""examples/slurm/pretrain.sbatch run for real on CPU without SLURM: srun, scontrol and scancel are small
stand-ins on PATH (one node, one process), SLURM_* variables as SLURM sets them, the time-limit signal
sent to the script as `--signal=B:USR1@120` would. First start: no checkpoint, from scratch; the signal:
checkpoint, requeue; the requeued start resumes; a failed start is not requeued."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tinyllama.train.checkpoint import find_latest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm" / "pretrain.sbatch"

FAKES = {
    # srun on one node: drop srun's options, run the command as the job step in a process group of its own
    "srun": """#!/bin/bash
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
echo "srun $*" >> "$FAKE_SLURM/log"
echo $$ > "$FAKE_SLURM/step.pid"
exec setsid "$@"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM/log"
case "$1 $2" in
  "show hostnames") echo localhost ;;
  "requeue $SLURM_JOB_ID") ;;
  *) exit 1 ;;
esac
""",
    # scancel --signal=SIG JOB: SIG to every process of the job's steps (here: the one step's process group)
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$FAKE_SLURM/log"
sig=TERM
for a in "$@"; do case $a in --signal=*) sig=${a#--signal=} ;; esac; done
kill -s "$sig" -- -"$(cat "$FAKE_SLURM/step.pid")"
""",
}


def test_sbatch_script_parses_and_asks_for_what_the_launch_needs():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    directives = [line.split()[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    for d in ("--ntasks-per-node=1", "--signal=B:USR1@120", "--requeue", "--open-mode=append"):
        assert d in directives
    assert any(d.startswith("--nodes=") for d in directives) and any(d.startswith("--gpus-per-node=") for d in directives)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm(tmp_path) -> dict:
    """PATH with the stand-ins, SLURM's variables for a one-node job, a tiny synthetic CPU run."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tinyllama-tiny", "vocab_size": 512},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 200},
        "data": {"sources": "synthetic", "seq_len": 32, "vocab_size": 512, "seed": 5},
        "train": {"micro_batch": 2, "global_batch": 4, "max_steps": 10_000, "eval_every": 0, "eval_blocks": 4,
                  "save_every": 0, "log_every": 1, "device": "cpu", "loggers": "jsonl"},
    }))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM=str(state),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node001", SLURM_NNODES="1", GPUS_PER_NODE="1",
               RDZV_PORT=str(_free_port()), PYTHON=sys.executable, CONFIG=str(cfg), OUT=str(out),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SLURM_RESTART_COUNT", None)
    return {"env": env, "out": out, "log": state / "log"}


def _train_steps(out: Path) -> list[int]:
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r["step"] for r in recs if r["kind"] == "train"]


def _calls(slurm: dict, prefix: str) -> list[str]:
    return [line for line in slurm["log"].read_text().splitlines() if line.startswith(prefix)]


def test_sbatch_starts_fresh_requeues_after_the_time_limit_signal_then_resumes(slurm):
    out = slurm["out"]
    (out / "checkpoints" / "step-0000003.tmp").mkdir(parents=True)  # the run dir exists, with no checkpoint

    # First start: nothing to resume, from scratch. USR1 as SLURM sends it 120 s before the limit.
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=slurm["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while len(_train_steps(out)) < 3:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no training steps"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    assert f"no checkpoint in {out / 'checkpoints'}; starting from scratch" in output
    assert "SIGTERM received: checkpoint written, exiting" in output
    assert _calls(slurm, "scancel") == ["scancel --signal=TERM 4242"]
    assert _calls(slurm, "scontrol requeue") == ["scontrol requeue 4242"]
    srun = _calls(slurm, "srun")
    assert len(srun) == 1 and "--rdzv-backend c10d --rdzv-endpoint localhost:" in srun[0]
    assert "--rdzv-id 4242" in srun[0] and "--nnodes 1 --nproc_per_node 1" in srun[0] and "--resume" in srun[0]
    stopped = len(_train_steps(out))
    assert find_latest(out / "checkpoints").name == f"step-{stopped:07d}"

    # The requeued start (SLURM runs the script again): resumes there and finishes; no requeue after that.
    env = dict(slurm["env"], SLURM_RESTART_COUNT="1")
    done = subprocess.run(["bash", str(SCRIPT), "--train.max_steps", str(stopped + 2)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:07d}'}" in done.stdout + done.stderr
    assert _train_steps(out) == list(range(1, stopped + 3))
    assert len(_calls(slurm, "scontrol requeue")) == 1

    # A start that fails (here a bad setting) exits non-zero and is not requeued: no crash loop.
    failed = subprocess.run(["bash", str(SCRIPT), "--train.max_steps", "0"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode != 0
    assert "train.max_steps must be" in failed.stdout + failed.stderr
    assert len(_calls(slurm, "scontrol requeue")) == 1
