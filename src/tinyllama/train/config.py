"""Run configuration: one dataclass per concern, loaded from YAML and overridden from the command line.

A run file has four sections::

    model: {preset: tinyllama-1.1b, n_layers: 22, ...}   # a preset plus ModelConfig field overrides
    optim: {...}                                          # OptimConfig
    data:  {...}                                          # DataConfig (tinyllama.data)
    train: {...}                                          # TrainConfig

`--train.max_steps 50` on the command line overrides `train.max_steps`. Recipe names such as
`recipes/tinyllama-1.1b.yaml` or `tinyllama-1.1b` resolve to the recipes packaged with tinyllama when
no such file exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from tinyllama.checks import NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, check_number, unless_off
from tinyllama.config import PRESETS, ModelConfig, build_config, load_config, parse_overrides, read_yaml_mapping  # noqa: F401
from tinyllama.errors import TinyLlamaError
from tinyllama.train.optim import OptimConfig

NONFINITE_POLICIES = ("skip", "stop")


@dataclass
class LoopConfig:
    """What the one training loop (`tinyllama.train.loop`) needs, shared by pretraining and fine-tuning."""

    out_dir: str = "out/pretrain"
    device: Optional[str] = None  # None = cuda when available (LOCAL_RANK picks the card), else cpu
    micro_batch: int = 8  # sequences (or pairs) per device per forward/backward
    global_batch: int = 8  # per optimizer step, all devices and accumulation together
    max_steps: Optional[int] = None
    seed: int = 1337
    # auto = bf16 autocast with fp32 master weights where bf16 is native (GPU, AVX512-BF16/AMX CPU), else fp32
    dtype: str = "auto"
    log_every: int = 1
    eval_every: int = 100  # steps; 0 = only at the end
    save_every: int = 500  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept besides the every-M-th ones
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    save_final: bool = True
    async_checkpoint: bool = True  # overlap checkpoint writes with training where torch supports it (GPU)
    nonfinite_policy: str = "skip"  # skip = skip the step and count it; stop = checkpoint and stop
    max_consecutive_nonfinite: int = 5  # with "skip": checkpoint and stop after this many in a row
    progress: bool = True  # the live progress line on rank 0 (validation, summary and errors print regardless)
    # Where metrics go: any of jsonl, tensorboard, wandb, mlflow, as a list or "jsonl,wandb" (null: jsonl, plus
    # tensorboard when installed). Only rank 0 logs; train.metrics.MetricsLog says what each tracker gets.
    loggers: Any = None
    tensorboard: bool = True  # older setting, kept: false leaves tensorboard out of the default loggers
    # the W&B project / MLflow experiment (null: $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME, else "tinyllama")
    tracker_project: Optional[str] = None
    run_name: Optional[str] = None  # the tracker run's name (null: the out_dir's name)
    # write a Hugging Face directory here at the end (relative to out_dir; none = off); into an existing
    # directory only the model files are replaced (a re-run updates its export), other files are kept
    export_hf: Optional[str] = None
    # torch.profiler over steps profile_from_step+1 .. +profile_steps (None: off): OUT/profile/, per rank.
    profile_from_step: Optional[int] = None
    profile_steps: int = 2

    _positive = ("micro_batch", "global_batch", "log_every", "profile_steps")
    _non_negative = ("eval_every", "save_every", "keep_last", "keep_every", "max_consecutive_nonfinite")

    def __post_init__(self) -> None:
        self.export_hf = unless_off(self.export_hf)  # `--train.export_hf none` is off, not a folder

    def validate(self) -> None:
        for name in self._positive:
            check_number(getattr(self, name), f"train.{name}", **POSITIVE_INT)
        for name in self._non_negative:
            check_number(getattr(self, name), f"train.{name}", **NONNEGATIVE_INT)
        check_number(self.profile_from_step, "train.profile_from_step", none_ok=True, **NONNEGATIVE_INT)
        check_number(self.max_steps, "train.max_steps", none_ok=True, **POSITIVE_INT)
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise TinyLlamaError(f"train.nonfinite_policy is '{self.nonfinite_policy}'; choose one of {NONFINITE_POLICIES}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise TinyLlamaError(f"train.dtype is '{self.dtype}'; choose auto, float32 or bfloat16")
        if self.global_batch % self.micro_batch:
            raise TinyLlamaError(
                f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch ({self.micro_batch})"
            )
        self.logger_names()  # unknown trackers and missing packages stop here, on every rank, before any training

    def logger_names(self) -> tuple[str, ...]:
        """train.loggers resolved: the trackers this run writes to."""
        from tinyllama.train.metrics import resolve_loggers

        return resolve_loggers(self.loggers, self.tensorboard, "train config")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step, derived from the world size."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise TinyLlamaError(
                f"train config: global_batch ({self.global_batch}) must be a multiple of micro_batch × world size "
                f"({self.micro_batch} × {world_size} = {per_step}); change --train.global_batch or --train.micro_batch"
            )
        return self.global_batch // per_step


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining: the loop's settings plus data location, parallelism, kernels, stages and the demo's finish."""

    data_root: str = "out/data"  # where prepared datasets live (the demo corpus is prepared here)
    max_tokens: Optional[int] = None  # alternative to max_steps: stop after this many training tokens
    eval_blocks: int = 64  # held-out sequences per evaluation (all ranks together)
    compile: bool = False
    # Replay each optimizer step from one CUDA graph (train/graph.py): one GPU, one micro-batch per step,
    # fused AdamW. Cuts the host's launch time out of the step.
    cuda_graph: bool = False
    activation_checkpointing: bool = False
    fast_kernels: bool = False  # plug in tinyllama.kernels' fused ops when importable
    kernels: Optional[dict] = None  # tinyllama.kernels.KernelConfig fields (None: its defaults)
    hsdp_replicas: Optional[int] = None  # None = one replica per node (shard inside a node, replicate across)
    # FSDP2: free each block's gathered bf16 weights after its forward (True; all-gathered again in backward)
    # or keep them until its backward (False: one all-gather less per step for the weights' size in memory).
    fsdp_reshard_after_forward: bool = True
    fsdp_reduce_dtype: str = "float32"  # gradient reduce-scatter dtype: float32 (exact sums) or bfloat16
    init_from: Optional[str] = None  # start from another run's checkpoint (weights + optimizer), step 0
    init_optimizer: bool = True
    # Position on the LR curve = lr_step_offset + step × lr_step_scale (in optim.max_steps units): lets a later
    # stage continue the previous stage's curve, and a cooldown with 4× the batch move 4× faster along it.
    lr_step_offset: int = 0
    lr_step_scale: int = 1
    peak_tflops: Optional[float] = None  # for MFU; None = known GPUs (H100/H200 989, A100 312), else no MFU
    sample_prompt: Optional[str] = None  # print a generation from this prompt at the end
    sample_tokens: int = 40
    report_unigram_entropy: bool = False  # print the train tokens' unigram entropy beside the val loss

    _positive = LoopConfig._positive + ("eval_blocks", "sample_tokens", "lr_step_scale")
    _non_negative = LoopConfig._non_negative + ("lr_step_offset",)

    def validate(self) -> None:
        super().validate()
        check_number(self.peak_tflops, "train config: field 'peak_tflops'", none_ok=True, **POSITIVE)
        if self.max_steps is None and self.max_tokens is None:
            raise TinyLlamaError("train config: set 'max_steps' or 'max_tokens' (e.g. --train.max_steps 1000)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise TinyLlamaError(f"train config: field 'max_tokens' must be a positive integer, got {self.max_tokens!r}")
        if self.fsdp_reduce_dtype not in ("float32", "bfloat16"):
            raise TinyLlamaError(
                f"train config: field 'fsdp_reduce_dtype' is '{self.fsdp_reduce_dtype}'; choose float32 or bfloat16"
            )


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": "tinyllama-tiny"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: Any = None  # tinyllama.data.DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = field(default="<defaults>", init=False, compare=False)  # where this config was read from (for messages)

    config_sections = ("model", "optim", "data", "train")

    @staticmethod
    def config_field_class(name: str, raw: Any):
        return data_config_class(raw) if name == "data" else None

    def model_config(self) -> ModelConfig:
        """The preset with the section's fields on top, through the one loader (types coerced: YAML 1.1
        reads 1e-6 without a dot as a string)."""
        d = dict(self.model or {})
        preset = d.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise TinyLlamaError(f"{self.source}: model.preset '{preset}' unknown; choose one of {sorted(PRESETS)}")
            d = {**dataclasses.asdict(PRESETS[preset]), **d}
        return build_config(ModelConfig, d, f"{self.source}: section 'model'")

    def seq_len(self) -> int:
        return int(getattr(self.data, "seq_len"))

    def to_dict(self) -> dict:
        out = {"model": dict(self.model)}
        for name in ("optim", "data", "train"):
            v = getattr(self, name)
            out[name] = _to_plain(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
        return out

    def validate(self) -> None:
        mc = self.model_config()
        self.optim.validate()
        self.train.validate()
        if hasattr(self.data, "validate"):
            self.data.validate()
        if self.seq_len() > mc.max_seq_len:
            raise TinyLlamaError(
                f"{self.source}: data.seq_len ({self.seq_len()}) exceeds the model's max_seq_len ({mc.max_seq_len})"
            )


def _to_plain(v):
    if isinstance(v, tuple):
        return [_to_plain(x) for x in v]
    if isinstance(v, list):
        return [_to_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def data_config_class(raw: Optional[dict] = None):
    """tinyllama.data's DataConfig; for `sources: synthetic` (benchmarks), a stand-in needing no data deps."""
    from tinyllama.train.synthetic import SyntheticDataConfig

    if isinstance(raw, dict) and raw.get("sources") == "synthetic":
        return SyntheticDataConfig
    try:
        from tinyllama.data.config import DataConfig
    except ImportError as e:  # e.g. zstandard/pyarrow missing on a bare GPU box
        raise TinyLlamaError(
            f"the data pipeline (tinyllama.data) cannot be imported ({e}); install the missing package, "
            "or train on synthetic tokens with --data.sources synthetic"
        ) from None
    return DataConfig


def recipes_dir() -> Path:
    return Path(str(resources.files("tinyllama") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """An existing file, else a packaged recipe by file name or stem (`recipes/tinyllama-1.1b.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    packaged = recipes_dir() / name
    if packaged.is_file():
        return packaged
    raise TinyLlamaError(f"{path}: config file not found (and no packaged recipe by that name; recipes: {', '.join(list_recipes())})")


def read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, "a mapping with sections model/optim/data/train")


def load_run_config(path: Optional[str] = None, overrides: Optional[list[str] | dict] = None,
                    default_recipe: str = "demo") -> RunConfig:
    """A recipe or YAML file (default: the demo recipe) with `--section.field value` overrides."""
    src = resolve_config_path(path or default_recipe)
    return _checked(load_config(RunConfig, src, overrides, source=str(src)), str(src))


def run_config_from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    return _checked(build_config(RunConfig, raw, source), source)


def _checked(cfg: RunConfig, source: str) -> RunConfig:
    cfg.source = source
    model = cfg.model
    if "preset" in model and model["preset"] not in PRESETS:
        raise TinyLlamaError(f"{source}: model.preset '{model['preset']}' unknown; choose one of {sorted(PRESETS)}")
    cfg.model_config()  # fail now on bad model fields
    return cfg
