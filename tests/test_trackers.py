"""Experiment trackers (train.loggers): metrics.jsonl, TensorBoard, Weights & Biases (offline) and MLflow (a
sqlite store in tmp_path), read back with each library's own reader; resume keeps every tracker's run."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest

from tinyllama.errors import TinyLlamaError
from tinyllama.train.config import load_run_config, run_config_from_dict
from tinyllama.train.metrics import flat_params, installed, resolve_loggers
from tinyllama.train.trainer import pretrain

from test_train import tiny_run
from test_finetune import _cfg, files  # noqa: F401  (the fixture: a tiny base model and chat/preference data)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """W&B offline with its files in tmp_path, MLflow on a sqlite file in tmp_path; no network."""
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield {"wandb_dir": wandb_dir, "mlflow_uri": uri}
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].teardown()  # its settings (read once per process) go with this test's environment


# ---- reading the trackers back ---------------------------------------------------------------------------
def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: a 7-byte header, then
    32 KiB blocks of chunks with a 7-byte header each: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_run(wandb_dir: Path, run_id: str) -> dict:
    """Every offline segment of one W&B run (a resume writes another): its history rows and config."""
    files = sorted(glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    rows: list[dict] = []
    configs: list[dict] = []
    for f in files:
        config: dict = {}
        for rec in wandb_records(Path(f)):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
            elif kind in ("run", "config"):
                items = rec.run.config.update if kind == "run" else rec.config.update
                config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
        configs.append(config)
    return {"segments": len(files), "rows": rows, "configs": configs}


def wandb_series(run: dict, key: str) -> list[tuple[int, float]]:
    return [(r["_step"], r[key]) for r in run["rows"] if key in r]


def jsonl_series(out: Path, kind: str, key: str) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in recs if r["kind"] == kind and key in r]


def mlflow_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def tensorboard_series(out: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


# ---- pretraining with every tracker, interrupted and resumed ---------------------------------------------
def test_pretrain_all_trackers_resume_same_runs_each_step_once(tmp_path, offline):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    tb = installed("tensorboard")
    loggers = "jsonl,tensorboard,wandb,mlflow" if tb else "jsonl,wandb,mlflow"
    # A run that "dies" after step 4 with its last checkpoint at step 2: every tracker has steps 1-4, and the
    # resumed run repeats steps 3 and 4 (no final save stands in for a kill after the step-4 metrics).
    pretrain(run_config_from_dict(tiny_run(out, max_steps=4, save_every=2, save_final=False, eval_every=2,
                                           log_every=2, loggers=loggers, tensorboard=True)))
    first = json.loads((out / "trackers.json").read_text())
    r = pretrain(run_config_from_dict(tiny_run(out, max_steps=6, save_every=2, eval_every=2, log_every=2,
                                               loggers=loggers, tensorboard=True)), resume=True)
    assert r["resumed_from"].endswith("step-0000002")
    ids = json.loads((out / "trackers.json").read_text())
    assert ids["wandb"]["run_id"] == first["wandb"]["run_id"] and ids["mlflow"]["run_id"] == first["mlflow"]["run_id"]

    losses = jsonl_series(out, "train", "loss")
    assert [s for s, _ in losses] == list(range(1, 7))  # metrics.jsonl: each step once
    val = jsonl_series(out, "val", "val_loss")
    assert [s for s, _ in val] == [2, 4, 6]

    # W&B: both offline segments are the one run; each step's row once, with the loss metrics.jsonl has
    run = wandb_run(offline["wandb_dir"], ids["wandb"]["run_id"])
    assert run["segments"] == 2
    assert wandb_series(run, "train/loss") == losses
    assert wandb_series(run, "val/val_loss") == val
    assert [s for s, _ in wandb_series(run, "train/tokens_per_s")] == [2, 4, 6]  # as the progress line shows
    assert {"train/lr", "train/grad_norm", "train/tokens", "train/skipped"} <= set(run["rows"][0])
    assert run["configs"][0]["train"]["max_steps"] == 4 and run["configs"][1]["train"]["max_steps"] == 6
    assert run["configs"][0]["model"]["preset"] == "tinyllama-tiny"

    # MLflow: one run in experiment "tinyllama", named after the out_dir; each step once; the config as
    # parameters (the first session's values; what changed at the resume as tags)
    client = MlflowClient(offline["mlflow_uri"])
    exp = client.get_experiment_by_name("tinyllama")
    runs = client.search_runs([exp.experiment_id])
    assert [x.info.run_id for x in runs] == [ids["mlflow"]["run_id"]]
    mrun = runs[0]
    assert mrun.info.run_name == "run" and mrun.info.status == "FINISHED"
    assert mlflow_series(client, mrun.info.run_id, "train/loss") == pytest.approx(losses)
    assert [s for s, _ in mlflow_series(client, mrun.info.run_id, "train/loss")] == list(range(1, 7))
    assert mlflow_series(client, mrun.info.run_id, "val/val_loss") == pytest.approx(val)
    assert [s for s, _ in mlflow_series(client, mrun.info.run_id, "train/grad_norm")] == list(range(1, 7))
    params = mrun.data.params
    assert params["train.max_steps"] == "4" and mrun.data.tags["resumed.train.max_steps"] == "6"
    assert params["optim.lr"] == "0.003" and params["model.preset"] == "tinyllama-tiny"
    assert params["data.sources"] == "synthetic" and params["train.loggers"] == loggers

    # TensorBoard: the resumed session's events replace the interrupted one's from step 3 on
    if tb:
        events = tensorboard_series(out, "train/loss")
        assert [s for s, _ in events] == list(range(1, 7))
        assert [v for _, v in events] == pytest.approx([v for _, v in losses], rel=1e-6)


def test_metrics_logged_twice_without_the_skip_would_duplicate(tmp_path, offline):
    """What the skip on resume prevents: MLflow keeps every value logged for a step, W&B offline writes a
    repeated step again in the resumed segment (so both would hold steps 3-4 twice above)."""
    pytest.importorskip("mlflow")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(offline["mlflow_uri"])
    run = client.create_run(client.create_experiment("dup"))
    for value in (1.0, 2.0):
        client.log_batch(run.info.run_id, metrics=[Metric("train/loss", value, 0, 3)])
    assert mlflow_series(client, run.info.run_id, "train/loss") == [(3, 1.0), (3, 2.0)]


def test_fresh_start_in_the_same_out_dir_gets_new_tracker_runs(tmp_path, offline):
    """--resume without a checkpoint starts from scratch, and so do the trackers: no steps from an attempt that
    never checkpointed, under a run that would then hold them twice."""
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    pretrain(run_config_from_dict(tiny_run(out, max_steps=2, save_final=False, loggers="jsonl,mlflow")))
    first = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    r = pretrain(run_config_from_dict(tiny_run(out, max_steps=2, loggers="jsonl,mlflow")), resume=True)
    assert r["resumed_from"] is None
    second = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    assert second != first
    from mlflow.tracking import MlflowClient

    client = MlflowClient(offline["mlflow_uri"])
    assert [s for s, _ in mlflow_series(client, second, "train/loss")] == [1, 2]


def test_mlflow_alone_resumes_without_repeating_steps(tmp_path, offline):
    """Without metrics.jsonl to say how far the interrupted attempt got, the run's own latest steps do."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    first = pretrain(run_config_from_dict(tiny_run(out, max_steps=4, save_every=2, save_final=False, eval_every=2,
                                                   loggers="mlflow")))
    second = pretrain(run_config_from_dict(tiny_run(out, max_steps=5, eval_every=2, loggers="mlflow")), resume=True)
    assert not (out / "metrics.jsonl").exists()
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(offline["mlflow_uri"])
    assert mlflow_series(client, run_id, "train/loss") == pytest.approx(list(enumerate(first["losses"] + second["losses"][2:], 1)))
    assert [s for s, _ in mlflow_series(client, run_id, "val/val_loss")] == [2, 4, 5]


@pytest.mark.slow
def test_only_rank_zero_logs_under_torchrun(tmp_path, offline):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from test_train_distributed import _torchrun

    out = tmp_path / "ddp"
    _torchrun(tmp_path, tiny_run(out, micro_batch=2, global_batch=4, max_steps=3, loggers="jsonl,wandb,mlflow"), 2)
    ids = json.loads((out / "trackers.json").read_text())
    assert len(glob.glob(str(offline["wandb_dir"] / "wandb" / "offline-run-*"))) == 1
    assert [s for s, _ in wandb_series(wandb_run(offline["wandb_dir"], ids["wandb"]["run_id"]), "train/loss")] == [1, 2, 3]
    client = MlflowClient(offline["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tinyllama").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    assert [s for s, _ in mlflow_series(client, runs[0].info.run_id, "train/loss")] == [1, 2, 3]


# ---- fine-tuning -------------------------------------------------------------------------------------------
def test_sft_logs_to_wandb(tmp_path, files, offline):
    pytest.importorskip("wandb")
    from tinyllama.finetune.trainer import finetune

    out = tmp_path / "sft"
    r = finetune(_cfg("sft", files, out, **{"train.max_steps": 3, "train.log_every": 1, "train.loggers": "wandb",
                                            "train.run_name": "my-sft", "train.tracker_project": "chat"}))
    assert r["step"] == 3
    assert not (out / "metrics.jsonl").exists()  # only the trackers asked for
    ids = json.loads((out / "trackers.json").read_text())
    assert ids["wandb"]["project"] == "chat"
    run = wandb_run(offline["wandb_dir"], ids["wandb"]["run_id"])
    assert [s for s, _ in wandb_series(run, "train/loss")] == [1, 2, 3]
    assert [v for _, v in wandb_series(run, "train/loss")] == pytest.approx(r["losses"])
    assert [s for s, _ in wandb_series(run, "val/val_loss")] == [3]
    assert run["configs"][0]["kind"] == "sft" and run["configs"][0]["train"]["max_steps"] == 3


def test_dpo_logs_its_reward_metrics_to_mlflow(tmp_path, files, offline):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tinyllama.finetune.trainer import finetune

    out = tmp_path / "dpo"
    finetune(_cfg("dpo", files, out, **{"train.max_steps": 2, "train.log_every": 1, "train.loggers": ["jsonl", "mlflow"],
                                        "optim.lr": 1e-3}))
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(offline["mlflow_uri"])
    for key in ("loss", "reward_margin", "reward_accuracy", "logp_margin"):
        assert mlflow_series(client, run_id, f"train/{key}") == pytest.approx(jsonl_series(out, "train", key))
    assert [s for s, _ in mlflow_series(client, run_id, "val/val_reward_accuracy")] == [2]
    params = client.get_run(run_id).data.params
    assert params["kind"] == "dpo" and params["dpo.beta"] == "0.1"


# ---- settings and errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_missing_tracker_package_is_one_line_before_training(tmp_path, monkeypatch, capsys, name):
    from tinyllama.cli import main

    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    out = tmp_path / "run"
    with pytest.raises(TinyLlamaError, match=rf"logger '{name}' needs the {name} package.*pip install 'tinyllama-forge\[{name}\]'"):
        pretrain(run_config_from_dict(tiny_run(out, loggers=f"jsonl,{name}", tensorboard=True)))
    assert not out.exists()  # nothing trained, nothing written
    rc = main(["pretrain", "--out", str(out), "--model.preset", "tinyllama-tiny", "--data.sources", "synthetic",
               "--train.loggers", f"jsonl,{name}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and f"tinyllama-forge[{name}]" in err[0]
    assert not out.exists()


def test_tracker_that_cannot_start_is_one_line_and_loses_no_metrics(tmp_path, offline, monkeypatch):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    pretrain(run_config_from_dict(tiny_run(out, max_steps=4, save_every=2, save_final=False)))
    before = (out / "metrics.jsonl").read_text()
    (tmp_path / "a-file").write_text("")  # no store can be made under a file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    with pytest.raises(TinyLlamaError, match=r"mlflow could not start a run at sqlite:///.*a-file.*MLFLOW_TRACKING_URI"):
        pretrain(run_config_from_dict(tiny_run(out, max_steps=6, loggers="jsonl,mlflow")), resume=True)
    # metrics.jsonl still says how far the interrupted attempt got, for the next resume's trackers
    assert (out / "metrics.jsonl").read_text() == before


def test_logger_names_resolve_from_strings_lists_and_the_older_tensorboard_setting(monkeypatch):
    tb = ("tensorboard",) if pytest.importorskip("tensorboard") else ()
    assert resolve_loggers(None) == ("jsonl",) + tb
    assert resolve_loggers(None, tensorboard=False) == ("jsonl",)
    assert resolve_loggers("jsonl, tensorboard,jsonl") == ("jsonl", "tensorboard")
    with pytest.raises(TinyLlamaError, match="names tensorboard but field 'tensorboard' is false"):
        resolve_loggers(["tensorboard"], tensorboard=False)
    assert resolve_loggers("") == ()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert resolve_loggers(None) == ("jsonl",)  # the default takes tensorboard only when installed
    with pytest.raises(TinyLlamaError, match=r"unknown logger\(s\) \['neptune'\]; choose from jsonl, tensorboard, wandb, mlflow"):
        resolve_loggers("jsonl,neptune")
    with pytest.raises(TinyLlamaError, match="field 'loggers' must be"):
        resolve_loggers(3)
    cfg = load_run_config("demo", ["--train.loggers", "[jsonl]", "--model.preset", "tinyllama-tiny"])
    assert cfg.train.logger_names() == ("jsonl",)
    with pytest.raises(TinyLlamaError, match="train config: field 'loggers'"):
        load_run_config("demo", ["--train.loggers", "jsonl,tb"]).validate()


def test_flat_params_dot_the_keys_and_cut_long_values():
    p = flat_params({"optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "train": {"kernels": {}, "prompt": "x" * 700},
                     "kind": "sft"}, limit=500)
    assert p == {"optim.lr": "0.0003", "optim.betas": "[0.9, 0.95]", "train.kernels": "{}", "train.prompt": "x" * 500,
                 "kind": "sft"}
