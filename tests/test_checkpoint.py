"""Checkpoint integrity: every save records its files' sizes and checksums; damage is caught before a load.

`pretrain --resume` falls back from a damaged newest checkpoint to the previous intact one with a warning
(or stops with one error line when none is left), `convert` refuses a damaged one, all through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from test_train import tiny_run
from tinyllama.cli import main
from tinyllama.config import ModelConfig
from tinyllama.model import Llama
from tinyllama.train import checkpoint as ck
from tinyllama.train.checkpoint import CheckpointManager, find_latest
from tinyllama.train.config import run_config_from_dict
from tinyllama.train.distributed import DistInfo
from tinyllama.train.trainer import pretrain


def _run(out: Path, max_steps: int) -> dict:
    return tiny_run(out, max_steps=max_steps, save_every=2, global_batch=2, log_every=2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4 (copied, never damaged itself)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pristine") / "run"
    pretrain(run_config_from_dict(_run(out, 4)))
    return out


@pytest.fixture
def run_dir(pristine, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(pristine, out)
    return out


def _step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step-{n:07d}"


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


INTEGRITY_FILE = "integrity.json"
DAMAGES = {
    "truncated_distcp": lambda d: _truncate(d / "__0_0.distcp", (d / "__0_0.distcp").stat().st_size // 2),
    "random_metadata": lambda d: (d / ".metadata").write_bytes(os.urandom((d / ".metadata").stat().st_size)),
    "truncated_trainer_state": lambda d: _truncate(d / "trainer_state.pt", 700),
}
DAMAGED_FILE = {"truncated_distcp": "__0_0.distcp", "random_metadata": ".metadata",
                "truncated_trainer_state": "trainer_state.pt"}


def _as_saved_before_records(run_dir: Path) -> None:
    """Make the run's checkpoints look like older saves: no record, and no mention of one in meta.json."""
    for step in (2, 4):
        (_step(run_dir, step) / INTEGRITY_FILE).unlink(missing_ok=True)
        meta = _step(run_dir, step) / "meta.json"
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "integrity"}))


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _resume(capsys, run_dir: Path, tmp_path: Path, max_steps: int = 6) -> tuple[int, str]:
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(yaml.safe_dump(_run(run_dir, max_steps)))
    return _cli(capsys, "pretrain", "--config", str(cfg), "--resume", "--train.progress", "true")


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_record_covers_every_file_and_verifies(pristine):
    ckpt = _step(pristine, 4)
    record = json.loads((ckpt / INTEGRITY_FILE).read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE}
    assert set(record["files"]) == on_disk >= {".metadata", "__0_0.distcp", "trainer_state.pt", "meta.json",
                                                "rng/rank-00000.pt"}
    for rel, entry in record["files"].items():
        assert entry["size"] == (ckpt / rel).stat().st_size
    assert ck.verify_checkpoint(ckpt) is None


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_verify_names_the_damaged_file(run_dir, damage):
    ckpt = _step(run_dir, 4)
    DAMAGES[damage](ckpt)
    with pytest.raises(ck.DamagedCheckpoint, match=f"damaged checkpoint: {DAMAGED_FILE[damage]} is"):
        ck.verify_checkpoint(ckpt)
    ck.verify_checkpoint(_step(run_dir, 2))  # the other one is untouched


def test_a_flipped_byte_of_the_same_size_is_caught_by_the_checksum(run_dir):
    f = _step(run_dir, 4) / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    ck.verify_checkpoint(f.parent, checksums=False)  # sizes alone cannot see it
    with pytest.raises(ck.DamagedCheckpoint, match="__0_0.distcp is corrupted"):
        ck.verify_checkpoint(f.parent)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_convert_refuses_a_damaged_checkpoint(run_dir, tmp_path, capsys, damage):
    DAMAGES[damage](_step(run_dir, 4))
    for source in (run_dir, _step(run_dir, 4)):  # via the run's latest, or named directly
        rc, err = _cli(capsys, "convert", "--checkpoint", str(source), "--out", str(tmp_path / "hf"))
        assert rc == 2
        line = _one_error_line(err)
        assert "step-0000004: damaged checkpoint" in line and DAMAGED_FILE[damage] in line
        assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_previous_intact_checkpoint(run_dir, tmp_path, capsys, damage):
    DAMAGES[damage](_step(run_dir, 4))
    rc, err = _resume(capsys, run_dir, tmp_path)
    assert rc == 0, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert any(line.startswith("warning: checkpoint step-0000004 is damaged") and DAMAGED_FILE[damage] in line
               and "moved it to step-0000004.damaged" in line for line in lines), err
    assert "warning: resuming from the newest intact checkpoint, step-0000002" in lines
    assert f"resumed from {_step(run_dir, 2)} (step 2" in err
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step-0000004.damaged").is_dir()  # kept for inspection
    assert find_latest(ckpts).name == "step-0000006"
    ck.verify_checkpoint(_step(run_dir, 4))  # step 4 was written again, intact


def test_resume_with_latest_naming_a_missing_folder(run_dir, tmp_path, capsys):
    shutil.rmtree(_step(run_dir, 4))
    rc, err = _resume(capsys, run_dir, tmp_path)
    assert rc == 0, err
    pointer = run_dir / "checkpoints" / "latest"
    assert f"warning: {pointer} names 'step-0000004', which does not exist" in err.splitlines()
    assert f"resumed from {_step(run_dir, 2)} (step 2" in err


def test_convert_reports_latest_naming_a_missing_folder(run_dir, tmp_path, capsys):
    shutil.rmtree(_step(run_dir, 4))
    rc, err = _cli(capsys, "convert", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    assert rc == 2
    line = _one_error_line(err)
    assert "latest names 'step-0000004', which does not exist" in line and "step-0000002" in line


def test_resume_stops_with_one_line_when_no_intact_checkpoint_is_left(run_dir, tmp_path, capsys):
    DAMAGES["truncated_distcp"](_step(run_dir, 4))
    DAMAGES["random_metadata"](_step(run_dir, 2))
    rc, err = _resume(capsys, run_dir, tmp_path)
    assert rc == 2
    line = _one_error_line(err)
    assert "no intact checkpoint to resume from" in line and "step-0000004: __0_0.distcp" in line
    assert "step-0000002: .metadata" in line
    # nothing was moved or deleted: the user decides
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]


def test_resume_stops_when_latest_names_a_missing_folder_and_nothing_is_left(run_dir, tmp_path, capsys):
    shutil.rmtree(_step(run_dir, 4))
    shutil.rmtree(_step(run_dir, 2))
    rc, err = _resume(capsys, run_dir, tmp_path)
    assert rc == 2
    assert "names 'step-0000004', which does not exist, and" in _one_error_line(err)


def test_a_lost_record_is_damage_but_a_checkpoint_from_before_records_loads(run_dir, tmp_path, capsys):
    ckpt = _step(run_dir, 4)
    (ckpt / INTEGRITY_FILE).unlink()
    with pytest.raises(ck.DamagedCheckpoint, match=f"{INTEGRITY_FILE} is missing"):
        ck.verify_checkpoint(ckpt)
    _as_saved_before_records(run_dir)
    assert "not verified" in ck.verify_checkpoint(ckpt)
    rc, err = _cli(capsys, "convert", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    assert rc == 0 and "note: step-0000004 has no integrity.json" in err
    rc, err = _resume(capsys, run_dir, tmp_path)
    assert rc == 0, err
    assert "note: step-0000004 has no integrity.json" in err and f"resumed from {ckpt} (step 4" in err


def test_damaged_checkpoint_without_record_is_one_line_not_a_traceback(run_dir, tmp_path, capsys):
    _as_saved_before_records(run_dir)
    DAMAGES["random_metadata"](_step(run_dir, 4))
    rc, err = _cli(capsys, "convert", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    note, error = err.strip().splitlines()  # the note that it is unverified, then the error
    assert rc == 2 and note.startswith("note: ") and error.startswith("error: ") and ".metadata: unreadable" in error
    DAMAGES["truncated_trainer_state"](_step(run_dir, 4))
    (_step(run_dir, 4) / ".metadata").write_bytes((_step(run_dir, 2) / ".metadata").read_bytes())
    rc, err = _resume(capsys, run_dir, tmp_path)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "trainer_state.pt: unreadable" in err


def test_async_save_writes_the_record_when_finalised(tmp_path):
    model = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512))
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 512, (2, 9))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    opt.step()
    mgr = CheckpointManager(tmp_path, DistInfo(), use_async=True)
    assert mgr.use_async
    mgr.save(1, model, opt, {"trainer": {}, "loader": {}}, {"step": 1, "model": model.config.to_dict()})
    mgr.wait()
    ckpt = tmp_path / "checkpoints" / "step-0000001"
    assert ck.verify_checkpoint(ckpt) is None
    assert "__0_0.distcp" in json.loads((ckpt / INTEGRITY_FILE).read_text())["files"]
