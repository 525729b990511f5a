"""What a run reports: rank 0's progress line and printed results, and its metrics to the trackers that
`train.loggers` names: metrics.jsonl, TensorBoard, Weights & Biases, MLflow (`MetricsLog`)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tinyllama.errors import TinyLlamaError, pip_extra


class Progress:
    """Rank 0's output. `update` draws the live progress line (carriage return on a terminal, one line per
    log_every otherwise) only when `live`; `print` (validation results, the summary, notes) always prints on
    rank 0, so `--train.progress false` silences the bar and nothing else."""

    def __init__(self, main: bool, live: bool = True, stream=None) -> None:
        self.main, self.live = main, live and main
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False

    def update(self, text: str, force_line: bool = False) -> None:
        if not self.live:
            if force_line and self.main:  # a skipped step is news even without the bar
                self.print(text)
            return
        if self.tty and not force_line:
            self.stream.write("\r\033[K" + text)
            self._open = True
        else:
            self.end()
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def print(self, text: str) -> None:
        if self.main:
            self.end()
            print(text, file=self.stream, flush=True)


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ---- metrics: one record per step (and per validation) to every tracker of train.loggers ----------------------
LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
OPTIONAL = ("tensorboard", "wandb", "mlflow")  # each is a module and an extra of the same name
DEFAULT_PROJECT = "tinyllama"
IDS_FILE = "trackers.json"  # in out_dir: each tracker's run id, so --resume continues the same run


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (mlflow alone takes seconds)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_loggers(loggers: Any, tensorboard: bool = True, where: str = "train config") -> tuple[str, ...]:
    """`train.loggers` (a comma-separated string or a list; None: jsonl, plus tensorboard when installed) as
    backend names. `tensorboard: false` (the older setting) leaves tensorboard out of the default. An unknown
    name, or one whose package is missing, is a one-line error naming the extra to install."""
    if loggers is None:
        names = ["jsonl"] + (["tensorboard"] if tensorboard and installed("tensorboard") else [])
    elif isinstance(loggers, str):
        names = [n.strip() for n in loggers.split(",") if n.strip()]
    elif isinstance(loggers, (list, tuple)) and all(isinstance(n, str) for n in loggers):
        names = [n.strip() for n in loggers if n.strip()]
    else:
        raise TinyLlamaError(f"{where}: field 'loggers' must be a comma-separated string or a list of names "
                             f"({', '.join(LOGGERS)}), got {loggers!r}")
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise TinyLlamaError(f"{where}: field 'loggers' names unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)}")
    if not tensorboard and "tensorboard" in names:
        raise TinyLlamaError(f"{where}: field 'loggers' names tensorboard but field 'tensorboard' is false; "
                             "drop one of them (train.loggers alone says it)")
    for n in names:
        if n in OPTIONAL and not installed(n):
            raise TinyLlamaError(f"{where}: logger '{n}' needs the {n} package, which is not installed: "
                                 f"{pip_extra(n)} (or leave it out of train.loggers)")
    return tuple(dict.fromkeys(names))


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """A record as (step, {"<kind>/<name>": value}): its finite numbers, booleans as 0/1."""
    kind = record.get("kind", "train")
    out = {}
    for k, v in record.items():
        if k not in ("kind", "step") and isinstance(v, (int, float)) and math.isfinite(v):
            out[f"{kind}/{k}"] = float(v)
    return int(record.get("step", 0)), out


def flat_params(config: dict, limit: int) -> dict[str, str]:
    """A nested config as flat parameters ("optim.lr": "0.0004"), each value cut to `limit` characters."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            out[prefix] = str(v)[:limit]

    walk("", config)
    return out


def _require(module: str):
    """Import a tracker's package; a broken or missing one is a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TinyLlamaError(f"train.loggers: logger '{module}' cannot import its package ({_one_line(e)}): "
                             f"{pip_extra(module)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Tracker:
    """One backend of `MetricsLog`: gets every record (kind, step, metrics) in order. `run_id` is what --resume
    needs to continue the same run (kept in OUT/trackers.json)."""

    name = ""
    run_id: Optional[str] = None

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def ids(self) -> dict:
        return {"run_id": self.run_id}

    def close(self) -> None:
        pass


class JsonlTracker(Tracker):
    """OUT/metrics.jsonl, a record a line. On resume the records past the checkpoint go (the run repeats those
    steps); `logged_through` is how far the interrupted attempt had got, per kind, for the other trackers.
    `open()` rewrites the file: after the other trackers have started, so a failed start loses nothing."""

    name = "jsonl"

    def __init__(self, out_dir: Path, resume_step: Optional[int]) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.logged_through: dict[str, int] = {}
        self.keep: list[str] = []
        self.file = None
        if resume_step is None or not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill -9
            if not isinstance(rec, dict):
                continue
            step, kind = rec.get("step", 0), rec.get("kind", "train")
            if step <= resume_step:
                self.keep.append(line)
            else:
                self.logged_through[kind] = max(self.logged_through.get(kind, 0), step)

    def open(self) -> None:
        from tinyllama.fileio import atomic_file

        if self.path.exists():
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(k + "\n" for k in self.keep))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TensorBoardTracker(Tracker):
    """OUT/tensorboard. purge_step makes TensorBoard hide an earlier attempt's events from this session's first
    step on, so steps repeated after a resume show once, with this session's values."""

    name = "tensorboard"

    def __init__(self, out_dir: Path, resume_step: Optional[int]) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.tb.close()


class WandbTracker(Tracker):
    """A Weights & Biases run: project, name, the config; WANDB_MODE/WANDB_ENTITY/WANDB_API_KEY as usual, run files
    in OUT/wandb unless WANDB_DIR says where. --resume continues the same id (resume="allow"). Steps are logged
    explicitly: W&B keeps one row per step and ignores steps below its counter (online, a resumed run's counter
    is past what it holds); steps the interrupted attempt logged are not sent again."""

    name = "wandb"

    def __init__(self, out_dir: Path, run_id: Optional[str], config: dict, project: Optional[str], run_name: str,
                 skip: dict[str, int]) -> None:
        wandb = _require("wandb")
        # dir given each time: wandb reads WANDB_DIR once per process, at its first init
        kwargs = dict(project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name,
                      id=run_id, resume="allow", config=config, allow_val_change=True,
                      dir=os.environ.get("WANDB_DIR") or str(out_dir))
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # e.g. no API key outside offline mode
            raise TinyLlamaError(f"train.loggers: wandb could not start a run ({_one_line(e)}); "
                                 "log in (wandb login) or set WANDB_MODE=offline") from None
        # the interrupted attempt's steps are in the run it continues; a new run takes them all
        self.run_id, self.project, self.skip = self.run.id, kwargs["project"], (skip if run_id else {})
        try:  # `step` is the next step W&B takes: a resumed online run's counter is past what it holds
            self.held = max(self.run.step - 1, 0) if self.run.resumed else 0
        except Exception:  # modes without a counter (shared, disabled)
            self.held = 0

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        if values and step > max(self.skip.get(record.get("kind", "train"), 0), self.held):
            self.run.log(values, step=step)

    def ids(self) -> dict:
        return {"run_id": self.run_id, "project": self.project}

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run in experiment `project`; MLFLOW_TRACKING_URI picks the store as usual, and a resumed run
    goes back to the store it started in. The config becomes parameters ("optim.lr"), cut to MLflow's length
    limit; parameters never change in MLflow, so values changed at a resume are kept as tags "resumed.<name>".
    MLflow would keep a second value for a step logged twice: steps the run holds already are skipped."""

    name = "mlflow"

    def __init__(self, stored: dict, config: dict, project: Optional[str], run_name: str, skip: dict[str, int],
                 say: Callable[[str], None]) -> None:
        mlflow = _require("mlflow")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:  # older releases: 500 characters
            limit = 500
        self.Metric, self.say, self.warned = Metric, say, False
        # the store: a resumed run's own, else MLFLOW_TRACKING_URI or MLflow's default
        self.uri = str(stored.get("tracking_uri") or mlflow.get_tracking_uri())
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            run = self._stored_run(stored.get("run_id"))
            continued = run is not None
            if run is None:
                self.experiment = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
                run = self.client.create_run(self._experiment_id(self.experiment), run_name=run_name)
            else:
                self.experiment = stored.get("experiment", project)
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.run_id = run.info.run_id
            have = run.data.params
            params = flat_params(config, limit)
            entities = [Param(k, v) for k, v in params.items() if k not in have] + \
                       [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in have and have[k] != v]
            for i in range(0, len(entities), 100):  # MLflow takes at most 100 parameters and tags per batch
                part = entities[i:i + 100]
                self.client.log_batch(self.run_id, params=[e for e in part if isinstance(e, Param)],
                                      tags=[e for e in part if isinstance(e, RunTag)])
            # the latest point of each metric is the one of its highest step
            held = [(m.key.split("/", 1)[0], m.step) for m in run.data.to_proto().metrics]
        except Exception as e:  # an unreachable server, a store it cannot open
            raise TinyLlamaError(f"train.loggers: mlflow could not start a run at {self.uri} ({_one_line(e)}); "
                                 "set MLFLOW_TRACKING_URI to a reachable tracking server or a local store") from None
        self.skip = dict(skip) if continued else {}  # a new run takes the repeated steps too
        for kind, step in held:
            self.skip[kind] = max(self.skip.get(kind, 0), step)

    def _stored_run(self, run_id: Optional[str]):
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            self.say(f"note: mlflow run {run_id} is not in {self.uri}; starting a new MLflow run")
            return None

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created meanwhile by another run
            return self.client.get_experiment_by_name(name).experiment_id

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        if not values or step <= self.skip.get(record.get("kind", "train"), 0):
            return
        ts = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, ts, step) for k, v in values.items()])
        except Exception as e:  # a tracking server's hiccup must not stop a long run; metrics.jsonl has every step
            if not self.warned:
                self.say(f"warning: mlflow could not log step {step} ({_one_line(e)}); training goes on and keeps trying")
                self.warned = True

    def ids(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.experiment}

    def close(self) -> None:
        try:
            self.client.set_terminated(self.run_id)
        except Exception as e:
            self.say(f"warning: mlflow could not close run {self.run_id} ({_one_line(e)})")


class MetricsLog:
    """Rank 0's metrics: every record (each training step, each validation) to each tracker in `loggers` (see
    `resolve_loggers`), the config as the run's parameters. `resume_step` (a resumed run's checkpoint step, else
    None) keeps each tracker's run: their ids are in OUT/trackers.json, and steps past the checkpoint that
    the interrupted attempt had logged are not logged twice."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: Optional[int], loggers: Sequence[str] = ("jsonl",),
                 *, config: Optional[dict] = None, project: Optional[str] = None, run_name: Optional[str] = None,
                 say: Callable[[str], None] = print) -> None:
        self.enabled, self.out_dir = enabled, Path(out_dir)
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stored = self._read_ids() if resume_step is not None else {}  # a fresh start starts fresh tracker runs
        run_name = run_name or self.out_dir.resolve().name
        config = config or {}
        try:
            # metrics.jsonl is written last: a kill between the writes leaves it behind the others, never
            # ahead (its records past the checkpoint are what the others skip on resume)
            jsonl = JsonlTracker(self.out_dir, resume_step) if "jsonl" in loggers else None
            skip = jsonl.logged_through if jsonl else {}
            for name in loggers:
                if name == "tensorboard":
                    self.trackers.append(TensorBoardTracker(self.out_dir, resume_step))
                elif name == "wandb":
                    self.trackers.append(WandbTracker(self.out_dir, stored.get("wandb", {}).get("run_id"), config,
                                                      project, run_name, skip))
                elif name == "mlflow":
                    self.trackers.append(MlflowTracker(stored.get("mlflow", {}), config, project, run_name, skip, say))
            if jsonl is not None:
                jsonl.open()
                self.trackers.append(jsonl)
        except BaseException:
            self.close()
            raise
        self._write_ids(stored)

    @classmethod
    def for_run(cls, train_cfg, enabled: bool, resume_step: Optional[int], config: dict,
                say: Callable[[str], None] = print) -> "MetricsLog":
        """From a LoopConfig (train.loggers, tracker_project, run_name) and the run's whole config."""
        return cls(Path(train_cfg.out_dir), enabled, resume_step, train_cfg.logger_names(), config=config,
                   project=train_cfg.tracker_project, run_name=train_cfg.run_name, say=say)

    def _read_ids(self) -> dict:
        try:
            d = json.loads((self.out_dir / IDS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return {k: v for k, v in d.items() if isinstance(v, dict)} if isinstance(d, dict) else {}

    def _write_ids(self, stored: dict) -> None:
        from tinyllama.fileio import atomic_file

        # a tracker left out of a resumed session keeps its run for a later one
        ids = {**stored, **{t.name: t.ids() for t in self.trackers if t.run_id is not None}}
        path = self.out_dir / IDS_FILE
        if not ids:
            path.unlink(missing_ok=True)  # a fresh start: the previous runs' ids are not this run's
            return
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(ids, indent=2) + "\n")

    def write(self, record: dict) -> None:
        for t in self.trackers:
            t.write(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []
