"""Fine-tuning loop for SFT and DPO on the pretraining engine's pieces.

The same device/process setup (torchrun, FSDP2 for full fine-tuning), optimizer and learning-rate curve
(`tinyllama.train.optim`), DCP checkpoints with an atomic `latest` pointer and per-rank RNG state
(`tinyllama.train.checkpoint`), SIGTERM handling and metrics log as `tinyllama pretrain`. What differs is
the data (chat blocks or preference pairs, see chat_data.py) and the loss:

  sft: cross-entropy on assistant tokens only (targets elsewhere are -100).
  dpo: -log σ(β·[(log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))]) over the judged replies, with a frozen
       reference: the starting model (for LoRA, the same network with adapters switched off: no second copy).

LoRA (optionally over an int8/int4 base) freezes the base; on several processes each rank holds the whole
model and the adapters' gradients are averaged (they are small), since there is nothing worth sharding.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tinyllama.checks import FRACTION, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, check_fields, unless_off
from tinyllama.errors import TinyLlamaError
from tinyllama.finetune.lora import LoRAConfig
from tinyllama.train.optim import OptimConfig


# ---- configuration ----------------------------------------------------------------------------------
@dataclass
class FTModelConfig:
    path: Optional[str] = None  # Hugging Face model directory to start from
    reference: Optional[str] = None  # DPO: reference model directory (default: the starting model)


@dataclass
class ChatDataConfig:
    train: Optional[str] = None  # JSONL: messages (sft) or prompt/chosen/rejected (dpo)
    val: Optional[str] = None  # held-out JSONL; default: val_fraction of train
    val_fraction: float = 0.05
    seq_len: int = 2048
    packing: bool = True  # sft: several conversations per block
    limit: Optional[int] = None  # first N lines only


@dataclass
class FTTrainConfig:
    out_dir: str = "out/finetune"  # the commands default to out/sft and out/dpo
    micro_batch: int = 4  # blocks (sft) or pairs (dpo) per forward, per process
    global_batch: int = 32  # per optimizer step, all processes
    epochs: float = 1.0
    max_steps: Optional[int] = None  # default: epochs over the training set
    seed: int = 0
    device: Optional[str] = None
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    export_hf: Optional[str] = "hf"  # merged model directory (relative to out_dir); none = no export
    export_dtype: Optional[str] = None  # e.g. bfloat16; default: float32
    progress: bool = True

    def __post_init__(self) -> None:
        self.export_hf = unless_off(self.export_hf)


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (cDPO); 0 = the paper's loss


def sft_default_optim() -> OptimConfig:
    # TinyLlama-Chat / Zephyr recipe: lr 2e-5, cosine, 10% warm-up (filled in from the run length), no decay.
    return OptimConfig(lr=2e-5, min_lr=0.0, warmup_steps=-1, weight_decay=0.0)


def dpo_default_optim() -> OptimConfig:
    return OptimConfig(lr=5e-7, min_lr=0.0, warmup_steps=-1, weight_decay=0.0)


@dataclass
class FinetuneConfig:
    kind: str = "sft"  # sft or dpo
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    optim: OptimConfig = field(default_factory=sft_default_optim)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def validate(self) -> None:
        if self.kind not in ("sft", "dpo"):
            raise TinyLlamaError(f"finetune config: kind must be sft or dpo, got {self.kind!r}")
        if not self.model.path:
            raise TinyLlamaError("finetune config: model.path is required (a Hugging Face model directory; --model DIR)")
        if not self.data.train:
            raise TinyLlamaError("finetune config: data.train is required (a JSONL file; --data FILE)")
        check_fields(self.train, "finetune config: train.{}", micro_batch=POSITIVE_INT, global_batch=POSITIVE_INT,
                     log_every=POSITIVE_INT, keep_last=POSITIVE_INT, epochs=POSITIVE,
                     max_steps=dict(POSITIVE_INT, none_ok=True), eval_every=NONNEGATIVE_INT, save_every=NONNEGATIVE_INT)
        check_fields(self.data, "finetune config: data.{}", seq_len=dict(integer=True, lo=8), val_fraction=FRACTION,
                     limit=dict(POSITIVE_INT, none_ok=True))
        check_fields(self.dpo, "finetune config: dpo.{}", beta=POSITIVE, label_smoothing=dict(lo=0, hi=0.5))
        self.optim.validate(auto_warmup=True)  # -1: 10 % of the run, filled in when its length is known
        if self.lora.enabled or self.lora.quantize:
            self.lora.validate()


SECTIONS = {"model": FTModelConfig, "data": ChatDataConfig, "train": FTTrainConfig, "optim": OptimConfig,
            "lora": LoRAConfig, "dpo": DPOConfig}


def load_finetune_config(kind: str, path: Optional[str] = None, overrides: Optional[list[str]] = None,
                         **direct: Any) -> FinetuneConfig:
    """YAML sections (model, data, train, optim, lora, dpo) + `--section.field value` overrides + direct values
    given as 'section.field' keys."""
    import dataclasses

    from tinyllama.train.config import parse_overrides, read_yaml

    raw: dict = read_yaml(Path(path)) if path else {}
    if path and not Path(path).is_file():
        raise TinyLlamaError(f"{path}: config file not found")
    flat = parse_overrides(list(overrides or []))
    flat.update({k: v for k, v in direct.items() if v is not None})
    for key, val in flat.items():
        sec, _, name = key.partition(".")
        if sec not in SECTIONS or not name:
            raise TinyLlamaError(f"override '--{key}': unknown section; sections are {', '.join(SECTIONS)}")
        raw.setdefault(sec, {})
        if not isinstance(raw[sec], dict):
            raise TinyLlamaError(f"{path}: section '{sec}' must be a mapping")
        raw[sec][name] = val
    unknown = sorted(set(raw) - set(SECTIONS) - {"kind"})
    if unknown:
        raise TinyLlamaError(f"{path or 'config'}: unknown section(s) {unknown}; sections are {', '.join(SECTIONS)}")
    cfg = FinetuneConfig(kind=kind)
    if kind == "dpo":
        cfg.optim = dpo_default_optim()
    for sec, cls in SECTIONS.items():
        vals = raw.get(sec) or {}
        if not isinstance(vals, dict):
            raise TinyLlamaError(f"{path}: section '{sec}' must be a mapping")
        cur = getattr(cfg, sec)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(vals) - known)
        if bad:
            raise TinyLlamaError(f"{path or 'config'}: section '{sec}': unknown field(s) {bad}; known: {sorted(known)}")
        vals = {k: _coerce(cls, k, v, f"{path or 'config'}: {sec}.{k}") for k, v in vals.items()}
        try:
            setattr(cfg, sec, dataclasses.replace(cur, **vals))
        except (TypeError, ValueError) as e:
            raise TinyLlamaError(f"{path or 'config'}: section '{sec}': {e}") from None
    if cfg.lora.enabled and "lr" not in (raw.get("optim") or {}):
        # Adapters start from zero and are few: they need a far larger step than full fine-tuning.
        cfg.optim = dataclasses.replace(cfg.optim, lr=2e-4 if kind == "sft" else 5e-6)
    if "out_dir" not in (raw.get("train") or {}):
        cfg.train = dataclasses.replace(cfg.train, out_dir=f"out/{kind}")
    cfg.validate()
    return cfg


def _coerce(cls, name: str, value, where: str):
    """Numbers written like 3e-4 (a string to YAML 1.1) become floats; other mismatches are a clear error."""
    import typing

    t = typing.get_type_hints(cls).get(name)
    args = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) is typing.Union else [t]
    if value is None or not args:
        return value
    want = args[0]
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if want in (float, int) and isinstance(value, str):
        try:
            return want(float(value)) if want is int and float(value).is_integer() else want(value)
        except ValueError:
            raise TinyLlamaError(f"{where}: expected a number, got {value!r}") from None
    if want in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TinyLlamaError(f"{where}: expected a number, got {value!r}")
    if want is bool and not isinstance(value, bool):
        raise TinyLlamaError(f"{where}: expected true or false, got {value!r}")
    return value


# ---- losses -------------------------------------------------------------------------------------------
def masked_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over non-ignored positions of log p(target) per row: (B,)."""
    logits = model(inputs)
    mask = targets != -100
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def dpo_loss(policy_c, policy_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss and the implicit rewards β·(log π - log π_ref) of chosen and rejected."""
    logits = beta * ((policy_c - policy_r) - (ref_c - ref_r))
    loss = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return loss, beta * (policy_c - ref_c).detach(), beta * (policy_r - ref_r).detach()


# ---- the loop -------------------------------------------------------------------------------------------
class FinetuneTrainer:
    def __init__(self, cfg: FinetuneConfig, resume: bool = False, progress_stream=None) -> None:
        from tinyllama.train.distributed import init_distributed
        from tinyllama.train.trainer import Progress

        cfg.validate()
        self.cfg, self.resume = cfg, resume
        self.info = init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.out_dir)
        self.progress = Progress(cfg.train.progress and self.info.is_main, progress_stream)
        dev = self.info.device
        dt = cfg.train.dtype if cfg.train.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
        self.compute_dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                              "fp32": torch.float32}.get(dt)
        if self.compute_dtype is None:
            raise TinyLlamaError(f"train.dtype must be auto, bfloat16 or float32, got {dt!r}")
        self.lora = cfg.lora.enabled

    # -- model ---------------------------------------------------------------------------------------
    def _load(self, path: str):
        from tinyllama.loading import check_model_dir
        from tinyllama.model import Llama

        check_model_dir(path, "--model" if path == self.cfg.model.path else "--reference")
        # LoRA keeps the frozen base in the compute dtype (bf16 on GPU); full fine-tuning keeps fp32 master weights.
        dtype = self.compute_dtype if self.lora else torch.float32
        return Llama.from_pretrained(path, dtype=dtype, device=self.info.device)

    def build_model(self):
        from tinyllama.finetune.lora import apply_lora

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = self._load(cfg.model.path)
        self.model_cfg = model.config
        if self.lora:
            if cfg.lora.quantize:
                from tinyllama.quantize import quantize_model

                # The output head stays in full precision (as QLoRA does): it is one layer and sets every logit.
                quantize_model(model, cfg.lora.quantize, cfg.lora.group_size, skip=("lm_head",))
            apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        self.fsdp = self.info.is_distributed and not self.lora
        if self.fsdp:
            from tinyllama.train.distributed import apply_fsdp

            apply_fsdp(model, self.info, self.compute_dtype if self.compute_dtype != torch.float32 else None, None)
        return model

    def build_reference(self, model):
        cfg = self.cfg
        if cfg.kind != "dpo":
            return None
        if self.lora and not cfg.model.reference:
            return "adapters-off"
        ref = self._load(cfg.model.reference or cfg.model.path) if (cfg.model.reference or self.fsdp) else copy.deepcopy(model)
        for p in ref.parameters():
            p.requires_grad_(False)
        if self.fsdp:
            from tinyllama.train.distributed import apply_fsdp

            apply_fsdp(ref, self.info, self.compute_dtype if self.compute_dtype != torch.float32 else None, None)
        return ref.eval()

    def _autocast(self):
        if self.compute_dtype == torch.float32 or self.fsdp:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.compute_dtype)

    # -- data ----------------------------------------------------------------------------------------
    def build_data(self, tokenizer):
        from tinyllama.finetune.chat_data import (BlockLoader, pack_examples, read_chat_jsonl, read_preference_jsonl,
                                                  tokenize_conversations)

        d, t = self.cfg.data, self.cfg.train
        seq = min(d.seq_len, self.model_cfg.max_seq_len)
        rnd = random.Random(t.seed)
        if self.cfg.kind == "sft":
            train = read_chat_jsonl(d.train, d.limit)
            val = read_chat_jsonl(d.val) if d.val else None
        else:
            train = read_preference_jsonl(d.train, d.limit)
            val = read_preference_jsonl(d.val) if d.val else None
        if val is None and d.val_fraction > 0 and len(train) >= 2:
            order = list(range(len(train)))
            rnd.shuffle(order)
            n_val = max(1, int(len(train) * d.val_fraction))
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        self.seq_len = seq
        if self.cfg.kind == "sft":
            ex, truncated = tokenize_conversations(tokenizer, train, seq)
            if truncated:
                self.progress.print(f"note: {truncated} of {len(train)} conversations were longer than {seq} tokens and were cut")
            blocks = pack_examples(ex, seq, tokenizer.eos_id, d.packing)
            val_blocks = None
            if val:
                vex, _ = tokenize_conversations(tokenizer, val, seq)
                # Held-out conversations are scored one per block: no context from a neighbour.
                val_blocks = pack_examples(vex, seq, tokenizer.eos_id, packing=False) if vex else None
            self.train_items, self.val_items = blocks, val_blocks
            n = len(blocks)
        else:
            self.train_items, self.val_items = train, val
            n = len(train)
        loader = BlockLoader(torch.arange(n), t.micro_batch, seed=t.seed, rank=self.info.rank,
                             world_size=self.info.world_size)
        return loader

    def _batch(self, idx: torch.Tensor, items, tokenizer):
        from tinyllama.finetune.chat_data import preference_batch

        if self.cfg.kind == "sft":
            b = items[idx].long()
            return b[:, 0], b[:, 1]
        pairs = [items[int(i)] for i in idx]
        return preference_batch(tokenizer, pairs, self.seq_len, tokenizer.eos_id)

    # -- losses --------------------------------------------------------------------------------------
    def _loss(self, model, ref, inputs, targets):
        """Returns (loss to backprop, dict of float-able metric tensors)."""
        dev = self.info.device
        inputs, targets = inputs.to(dev), targets.to(dev)
        if self.cfg.kind == "sft":
            with self._autocast():
                _, loss = model(inputs, targets)
            return loss, {"loss": loss.detach().float()}
        from tinyllama.finetune.lora import adapters_disabled

        n = inputs.size(0) // 2
        with self._autocast():
            pol = masked_logps(model, inputs, targets)
            with torch.no_grad():
                if ref == "adapters-off":
                    with adapters_disabled(model):
                        refl = masked_logps(model, inputs, targets)
                else:
                    refl = masked_logps(ref, inputs, targets)
        losses, rc, rr = dpo_loss(pol[:n], pol[n:], refl[:n], refl[n:], self.cfg.dpo.beta, self.cfg.dpo.label_smoothing)
        loss = losses.mean()
        return loss, {"loss": loss.detach().float(), "reward_margin": (rc - rr).mean().float(),
                      "reward_accuracy": (rc > rr).float().mean(),
                      "logp_margin": (pol[:n] - pol[n:]).detach().mean().float()}

    @torch.no_grad()
    def evaluate(self, model, ref, tokenizer) -> Optional[dict]:
        """Held-out metrics: assistant-token loss (sft) or DPO loss / margins (dpo), averaged over items."""
        from tinyllama.train.distributed import all_reduce_

        items = self.val_items
        if items is None or len(items) == 0:
            return None
        was_training = model.training
        model.eval()
        dev = self.info.device
        mb = self.cfg.train.micro_batch
        n = len(items)
        mine = list(range(self.info.rank, n, self.info.world_size))
        if self.cfg.kind == "sft":
            acc = torch.zeros(2, dtype=torch.float64, device=dev)
            for s in range(0, len(mine), mb):
                b = items[torch.tensor(mine[s:s + mb])].long()
                inp, tgt = b[:, 0].to(dev), b[:, 1].to(dev)
                with self._autocast():
                    logits = model(inp)
                ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100,
                                     reduction="sum")
                acc += torch.stack([ce.double(), (tgt != -100).sum().double()])
            all_reduce_(acc, self.info)
            out = {"val_loss": float(acc[0] / acc[1]), "val_tokens": int(acc[1])}
        else:
            acc = torch.zeros(5, dtype=torch.float64, device=dev)
            for s in range(0, len(mine), mb):
                inp, tgt = self._batch(torch.tensor(mine[s:s + mb]), items, tokenizer)
                loss, m = self._loss(model, ref, inp, tgt)
                k = inp.size(0) // 2
                acc += torch.stack([loss.double() * k, m["reward_margin"].double() * k,
                                    m["reward_accuracy"].double() * k, m["logp_margin"].double() * k,
                                    torch.tensor(float(k), device=dev, dtype=torch.float64)])
            all_reduce_(acc, self.info)
            c = float(acc[4])
            out = {"val_loss": float(acc[0]) / c, "val_reward_margin": float(acc[1]) / c,
                   "val_reward_accuracy": float(acc[2]) / c, "val_logp_margin": float(acc[3]) / c, "val_pairs": int(c)}
        if was_training:
            model.train()
        return out

    # -- main ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        from tinyllama.tokenizer import Tokenizer
        from tinyllama.train.checkpoint import CheckpointManager
        from tinyllama.train.distributed import all_reduce_
        from tinyllama.train.optim import build_optimizer, clip_or_step_on_device, lr_at, set_lr
        from tinyllama.train.trainer import MetricsLog, StopRequest, _fmt_time, model_num_params

        cfg, t, info = self.cfg, self.cfg.train, self.info
        mp = Path(cfg.model.path)
        tokenizer = Tokenizer(mp) if any((mp / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else Tokenizer()
        model = self.build_model()
        ref = self.build_reference(model)
        loader = self.build_data(tokenizer)
        per_step = t.micro_batch * info.world_size
        if t.global_batch % per_step:
            raise TinyLlamaError(f"train.global_batch ({t.global_batch}) must be a multiple of micro_batch × processes "
                                 f"({t.micro_batch} × {info.world_size})")
        accum = t.global_batch // per_step
        n_items = len(self.train_items)
        max_steps = t.max_steps or max(1, math.ceil(t.epochs * n_items / t.global_batch))
        if cfg.optim.max_steps is None:
            cfg.optim.max_steps = max_steps
        if cfg.optim.warmup_steps < 0:
            cfg.optim.warmup_steps = int(0.1 * max_steps)
        optimizer = build_optimizer(model, cfg.optim)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ckpt = CheckpointManager(self.out_dir, info, t.keep_last, 0)
        step = 0
        result: dict[str, Any] = {"losses": [], "out_dir": str(self.out_dir), "stopped_by": None}
        if self.resume:
            latest = ckpt.latest()
            if latest is None:
                self.progress.print(f"no checkpoint in {ckpt.root}; starting from the base model")
            else:
                saved = ckpt.load(latest, model, optimizer)
                step = int(saved["trainer"]["step"])
                loader.load_state_dict(saved["loader"])
                result["resumed_from"] = str(latest)
                self.progress.print(f"resumed from {latest} (step {step})")
        elif ckpt.latest() is not None:
            raise TinyLlamaError(f"{ckpt.root} already holds checkpoints; pass --resume to continue, or choose another --out")
        metrics = MetricsLog(self.out_dir, info.is_main, step if self.resume else None, False)
        if info.is_main:
            import yaml

            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.progress.print(
            f"{cfg.kind}: {self.model_cfg.name} from {cfg.model.path} | {n_train / 1e6:.2f} M trainable of "
            f"{model_num_params(model) / 1e6:.1f} M{' (LoRA r=%d%s)' % (cfg.lora.r, ', ' + cfg.lora.quantize + ' base' if cfg.lora.quantize else '') if self.lora else ''}"
            f" | {n_items} {'blocks of %d tokens' % self.seq_len if cfg.kind == 'sft' else 'pairs'} | "
            f"{max_steps} steps of {t.global_batch} | device {info.device}{' × %d' % info.world_size if info.is_distributed else ''}")
        lora_params = [p for p in model.parameters() if p.requires_grad] if self.lora else None

        def save(block=False):
            meta = {"step": step, "kind": cfg.kind, "model": self.model_cfg.to_dict(), "run": cfg.to_dict(),
                    "world_size": info.world_size, "torch": torch.__version__}
            ckpt.save(step, model, optimizer, {"trainer": {"step": step}, "loader": loader.state_dict()}, meta, block=block)

        stop_reason = None
        t0_all = time.perf_counter()
        try:
            with StopRequest() as stop:
                model.train()
                while step < max_steps:
                    t0 = time.perf_counter()
                    lr = lr_at(step, cfg.optim)
                    set_lr(optimizer, lr)
                    sums: dict[str, torch.Tensor] = {}
                    batches = [self._batch(next(loader), self.train_items, tokenizer) for _ in range(accum)]
                    if cfg.kind == "sft":
                        # Token-level mean over the whole global batch, whatever the split into micro-batches
                        # and processes: each micro-batch's summed loss is divided by the global token count
                        # (times world size, as gradients are averaged over processes).
                        n_tok = torch.tensor([float(sum(int((tg != -100).sum()) for _, tg in batches))],
                                             device=info.device)
                        global_tok = float(all_reduce_(n_tok, info))
                    for inp, tgt in batches:
                        loss, m = self._loss(model, ref, inp, tgt)
                        if cfg.kind == "sft":
                            summed = loss * int((tgt != -100).sum())
                            (summed * (info.world_size / global_tok)).backward()
                            sums["loss"] = sums.get("loss", 0) + summed.detach().float() * (info.world_size / global_tok)
                        else:
                            (loss / accum).backward()
                            for k, v in m.items():
                                sums[k] = sums.get(k, 0) + v / accum
                    if lora_params is not None and info.is_distributed:
                        for p in lora_params:  # replicated adapters: average their gradients
                            if p.grad is not None:
                                all_reduce_(p.grad, info)
                                p.grad /= info.world_size
                    reduced = {k: all_reduce_(v.detach().clone(), info) / info.world_size for k, v in sums.items()}
                    gnorm, stepped = clip_or_step_on_device(optimizer, model, cfg.optim.grad_clip, reduced["loss"])
                    stats = {k: float(v) for k, v in reduced.items()}
                    finite = math.isfinite(stats["loss"]) and math.isfinite(float(gnorm))
                    if finite and not stepped:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    result["losses"].append(stats["loss"])
                    rec = {"kind": "train", "step": step, "lr": lr, "grad_norm": float(gnorm), "skipped": not finite,
                           **stats}
                    metrics.write(rec)
                    if step % t.log_every == 0 or step == max_steps or not finite:
                        extra = "".join(f" | {k} {v:.4f}" for k, v in stats.items() if k != "loss")
                        eta = (max_steps - step) * (time.perf_counter() - t0)
                        self.progress.update(f"step {step}/{max_steps} | loss {stats['loss']:.4f}{extra} | lr {lr:.2e} | "
                                             f"grad norm {float(gnorm):.3f} | ETA {_fmt_time(eta)}",
                                             force_line=not finite)
                    if t.eval_every and step % t.eval_every == 0 and step < max_steps:
                        ev = self.evaluate(model, ref, tokenizer)
                        if ev:
                            metrics.write({"kind": "val", "step": step, **ev})
                            self.progress.print(f"held-out at step {step}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
                    flag = all_reduce_(torch.tensor([1.0 if stop.requested else 0.0], device=info.device), info)
                    if flag.item() > 0:
                        stop_reason = f"{stop.signal_name or 'signal'} received: checkpoint written, exiting"
                        result["stopped_by"] = stop.signal_name or "signal"
                        break
                    if t.save_every and step % t.save_every == 0 and step < max_steps:
                        save()
                self.progress.end()
                save(block=True)
                ckpt.wait()
        finally:
            self.progress.end()
            metrics.close()
        result.update(step=step, checkpoint=str(ckpt.latest()), seconds=time.perf_counter() - t0_all,
                      trainable_params=n_train)
        if stop_reason:
            self.progress.print(stop_reason)
            return result
        ev = self.evaluate(model, ref, tokenizer)
        if ev:
            result.update(ev)
            metrics_line = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items())
            self.progress.print(f"held-out: {metrics_line}")
        self._export(model, tokenizer, result)
        return result

    def _export(self, model, tokenizer, result: dict) -> None:
        from tinyllama.convert import parse_dtype
        from tinyllama.finetune.lora import merge_lora, save_adapter

        t = self.cfg.train
        if self.lora:
            if self.info.is_main:
                adir = save_adapter(model, self.out_dir / "adapter", self.cfg.lora, self.cfg.model.path)
                result["adapter_dir"] = str(adir)
            plain = merge_lora(model, dtype=torch.float32) if t.export_hf else None
        elif t.export_hf:
            from tinyllama.train.trainer import gather_plain_model

            plain = gather_plain_model(model, self.model_cfg, self.info) if self.fsdp else model
        else:
            plain = None
        if plain is None or not self.info.is_main:
            return
        hf_dir = Path(t.export_hf)
        hf_dir = hf_dir if hf_dir.is_absolute() else self.out_dir / hf_dir
        plain.float().save_pretrained(hf_dir, tokenizer=tokenizer, dtype=parse_dtype(t.export_dtype))
        result["hf_dir"] = str(hf_dir)
        self.progress.print(f"saved the {'merged ' if self.lora else ''}model to {hf_dir} "
                            f"(try: tinyllama chat --model {hf_dir})")


def finetune(cfg: FinetuneConfig, resume: bool = False, progress_stream=None) -> dict:
    return FinetuneTrainer(cfg, resume=resume, progress_stream=progress_stream).run()
