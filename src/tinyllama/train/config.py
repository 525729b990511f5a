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
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from tinyllama.checks import POSITIVE, check_number, unless_off
from tinyllama.config import PRESETS, ModelConfig, dataclass_from_dict, read_yaml_mapping
from tinyllama.errors import TinyLlamaError
from tinyllama.train.optim import OptimConfig

NONFINITE_POLICIES = ("skip", "stop")


@dataclass
class TrainConfig:
    out_dir: str = "out/pretrain"
    data_root: str = "out/data"  # where prepared datasets live (the demo corpus is prepared here)
    device: Optional[str] = None  # None = cuda when available (LOCAL_RANK picks the card), else cpu
    micro_batch: int = 8  # sequences per device per forward/backward
    global_batch: int = 8  # sequences per optimizer step, all devices and accumulation together
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None  # alternative to max_steps: stop after this many training tokens
    eval_every: int = 100  # steps; 0 = only at the end
    eval_blocks: int = 64  # held-out sequences per evaluation (all ranks together)
    save_every: int = 500  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept besides the every-M-th ones
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    save_final: bool = True
    async_checkpoint: bool = True  # overlap checkpoint writes with training where torch supports it (GPU)
    log_every: int = 1
    dtype: str = "auto"  # auto = bf16 autocast on GPU with fp32 master weights, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    fast_kernels: bool = False  # plug in tinyllama.kernels' fused ops when importable
    kernels: Optional[dict] = None  # tinyllama.kernels.KernelConfig fields (None: its defaults)
    nonfinite_policy: str = "skip"  # skip = skip the step and count it; stop = checkpoint and stop
    max_consecutive_nonfinite: int = 5  # with "skip": checkpoint and stop after this many in a row
    seed: int = 1337
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
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True  # live progress line on rank 0
    export_hf: Optional[str] = None  # write a Hugging Face directory here at the end (relative to out_dir); none = off
    sample_prompt: Optional[str] = None  # print a generation from this prompt at the end
    sample_tokens: int = 40
    report_unigram_entropy: bool = False  # print the train tokens' unigram entropy beside the val loss
    # torch.profiler over steps profile_from_step+1 .. +profile_steps (None: off): OUT/profile/, per rank.
    profile_from_step: Optional[int] = None
    profile_steps: int = 2

    def __post_init__(self) -> None:
        self.export_hf = unless_off(self.export_hf)

    def validate(self) -> None:
        for name in ("micro_batch", "global_batch", "log_every", "eval_blocks", "sample_tokens", "lr_step_scale",
                     "profile_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TinyLlamaError(f"train config: field '{name}' must be a positive integer, got {v!r}")
        for name in ("eval_every", "save_every", "keep_last", "keep_every", "max_consecutive_nonfinite",
                     "lr_step_offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TinyLlamaError(f"train config: field '{name}' must be an integer >= 0, got {v!r}")
        v = self.profile_from_step
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise TinyLlamaError(f"train config: field 'profile_from_step' must be an integer >= 0 or null, got {v!r}")
        check_number(self.peak_tflops, "train config: field 'peak_tflops'", none_ok=True, **POSITIVE)
        if self.max_steps is None and self.max_tokens is None:
            raise TinyLlamaError("train config: set 'max_steps' or 'max_tokens' (e.g. --train.max_steps 1000)")
        for name in ("max_steps", "max_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise TinyLlamaError(f"train config: field '{name}' must be a positive integer, got {v!r}")
        if self.fsdp_reduce_dtype not in ("float32", "bfloat16"):
            raise TinyLlamaError(
                f"train config: field 'fsdp_reduce_dtype' is '{self.fsdp_reduce_dtype}'; choose float32 or bfloat16"
            )
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise TinyLlamaError(
                f"train config: field 'nonfinite_policy' is '{self.nonfinite_policy}'; choose one of {NONFINITE_POLICIES}"
            )
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise TinyLlamaError(f"train config: field 'dtype' is '{self.dtype}'; choose auto, float32 or bfloat16")
        if self.global_batch % self.micro_batch:
            raise TinyLlamaError(
                f"train config: global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )

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
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": "tinyllama-tiny"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: Any = None  # tinyllama.data.DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<defaults>"  # where this config was read from (for messages)

    def model_config(self) -> ModelConfig:
        d = dict(self.model or {})
        preset = d.pop("preset", None)
        for f in dataclasses.fields(ModelConfig):
            if f.type in (float, "float") and isinstance(d.get(f.name), str):
                d[f.name] = _float_or_text(d[f.name])  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            if preset is not None:
                return ModelConfig.from_name(preset, **d)
            return ModelConfig.from_dict(d)
        except TypeError as e:
            raise TinyLlamaError(f"{self.source}: section 'model': {e}") from None

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


def _float_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _check_types(obj, where: str) -> None:
    """Reject values of the wrong kind early (e.g. a string for an int), with the field's name."""
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        t = hints.get(f.name)
        if t is None or v is None:
            continue
        base = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) is typing.Union else [t]
        ok = False
        for b in base:
            b0 = typing.get_origin(b) or b
            if b0 is float and isinstance(v, str):
                try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                    v = float(v)
                    setattr(obj, f.name, v)
                except ValueError:
                    pass
            if b0 is float and isinstance(v, (int, float)) and not isinstance(v, bool):
                ok = True
            elif b0 is int and isinstance(v, int) and not isinstance(v, bool):
                ok = True
            elif b0 in (str, bool, tuple, list, dict) and isinstance(v, b0):
                ok = True
            elif b0 is tuple and isinstance(v, list):
                ok = True
            elif b0 not in (float, int, str, bool, tuple, list, dict):
                ok = True  # Any or something richer: trust the dataclass
        if not ok:
            raise TinyLlamaError(f"{where}: field '{f.name}' has value {v!r}, expected {t}")


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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['--optim.lr', '3e-4', '--train.compile=true'] -> {'optim.lr': 3e-4, 'train.compile': True}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise TinyLlamaError(f"unrecognised argument '{tok}': overrides look like --section.field value (e.g. --optim.lr 3e-4)")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise TinyLlamaError(f"override '{tok}' has no value")
            key, raw = tok[2:], items[i + 1]
            i += 2
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            val = raw
        out[key] = val
    return out


def merge_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, val in overrides.items():
        parts = key.split(".")
        if parts[0] not in ("model", "optim", "data", "train"):
            raise TinyLlamaError(f"override '--{key}': unknown section '{parts[0]}'; sections are model, optim, data, train")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise TinyLlamaError(f"override '--{key}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = val
    return raw


def load_run_config(path: Optional[str] = None, overrides: Optional[list[str] | dict] = None,
                    default_recipe: str = "demo") -> RunConfig:
    src = resolve_config_path(path or default_recipe)
    raw = read_yaml(src)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = merge_overrides(raw, overrides or {})
    return run_config_from_dict(raw, source=str(src))


def run_config_from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    unknown = sorted(set(raw) - {"model", "optim", "data", "train"})
    if unknown:
        raise TinyLlamaError(f"{source}: unknown section(s) {unknown}; sections are model, optim, data, train")
    model = raw.get("model") or {"preset": "tinyllama-tiny"}
    if not isinstance(model, dict):
        raise TinyLlamaError(f"{source}: section 'model' must be a mapping (e.g. {{preset: tinyllama-1.1b}})")
    if "preset" in model and model["preset"] not in PRESETS:
        raise TinyLlamaError(f"{source}: model.preset '{model['preset']}' unknown; choose one of {sorted(PRESETS)}")
    optim = dataclass_from_dict(OptimConfig, raw.get("optim"), f"{source}: section 'optim'")
    train = dataclass_from_dict(TrainConfig, raw.get("train"), f"{source}: section 'train'")
    _check_types(optim, f"{source}: section 'optim'")
    _check_types(train, f"{source}: section 'train'")
    data = dataclass_from_dict(data_config_class(raw.get("data")), raw.get("data"), f"{source}: section 'data'")
    cfg = RunConfig(model=model, optim=optim, data=data, train=train, source=source)
    cfg.model_config()  # fail now on bad model fields
    return cfg
