"""Fine-tuning (SFT and DPO) on the one training loop (`tinyllama.train.loop`) that pretraining runs.

The loop brings the step, gradient accumulation, clip-in-AdamW, the non-finite policy, out-of-memory advice,
signals, checkpoints and exact resume, metrics and profiling; this file brings the config, the model (FSDP2
for full fine-tuning, LoRA), the data (chat blocks or preference pairs, see chat_data.py) and the objective:

  sft: cross-entropy on assistant tokens only (targets elsewhere are -100).
  dpo: -log σ(β·[(log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))]) over the judged replies, with a frozen
       reference: the starting model (for LoRA, the same network with adapters switched off: no second copy).

LoRA (optionally over an int8/int4 base) freezes the base; on several processes each rank holds the whole
model and the adapters' gradients are averaged (they are small), since there is nothing worth sharding.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tinyllama.checks import FRACTION, POSITIVE, POSITIVE_INT, check_fields
from tinyllama.errors import TinyLlamaError
from tinyllama.finetune.lora import LoRAConfig
from tinyllama.config import parse_overrides
from tinyllama.train.config import LoopConfig
from tinyllama.train.distributed import all_reduce_
from tinyllama.train.loop import Objective, TrainLoop, autocast, resolve_compute_dtype
from tinyllama.train.metrics import MetricsLog, Progress
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
class FTTrainConfig(LoopConfig):
    """The loop's settings (train.loop) with fine-tuning's defaults, plus epochs and the export dtype."""

    out_dir: str = "out/finetune"  # the commands default to out/sft and out/dpo
    micro_batch: int = 4  # blocks (sft) or pairs (dpo) per forward, per process
    global_batch: int = 32  # per optimizer step, all processes
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    export_hf: Optional[str] = "hf"  # merged model directory (relative to out_dir); none = no export
    epochs: float = 1.0  # when max_steps is not given
    export_dtype: Optional[str] = None  # e.g. bfloat16; default: float32


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

    config_sections = ("model", "data", "train", "optim", "lora", "dpo")

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
        self.train.validate()
        check_fields(self.train, "finetune config: train.{}", epochs=POSITIVE)
        check_fields(self.data, "finetune config: data.{}", seq_len=dict(integer=True, lo=8), val_fraction=FRACTION,
                     limit=dict(POSITIVE_INT, none_ok=True))
        check_fields(self.dpo, "finetune config: dpo.{}", beta=POSITIVE, label_smoothing=dict(lo=0, hi=0.5))
        self.optim.validate(auto_warmup=True)  # -1: 10 % of the run, filled in when its length is known
        if self.lora.enabled or self.lora.quantize:
            self.lora.validate()


def load_finetune_config(kind: str, path: Optional[str] = None, overrides: Optional[list[str]] = None,
                         **direct: Any) -> FinetuneConfig:
    """The one config loader (`tinyllama.config.load_config`) with fine-tuning's defaults: YAML sections
    (model, data, train, optim, lora, dpo) + `--section.field value` overrides + direct 'section.field' values."""
    from tinyllama.config import load_config

    def defaults(user: dict) -> dict:
        optim = dpo_default_optim() if kind == "dpo" else sft_default_optim()
        if (user.get("lora") or {}).get("enabled") and "lr" not in (user.get("optim") or {}):
            # Adapters start from zero and are few: they need a far larger step than full fine-tuning.
            optim.lr = 2e-4 if kind == "sft" else 5e-6
        return {"kind": kind, "optim": asdict(optim), "train": {"out_dir": f"out/{kind}"}}

    flat = parse_overrides(list(overrides or []))
    flat.update({k: v for k, v in direct.items() if v is not None})
    cfg = load_config(FinetuneConfig, path, flat, base=defaults, source=str(path) if path else "finetune config")
    cfg.validate()
    return cfg


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


# ---- objectives ------------------------------------------------------------------------------------
class _ChatObjective(Objective):
    """Batches of chat blocks (sft) or preference pairs (dpo) from a `BlockLoader` over item indices."""

    def __init__(self, job: "FinetuneTrainer", loader, tokenizer) -> None:
        self.job, self.loader, self.tokenizer = job, loader, tokenizer
        self.device = job.info.device

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def _held_out_rows(self):
        """This rank's share of the held-out items, micro_batch at a time (index tensors)."""
        items, info = self.job.val_items, self.job.info
        mine = list(range(info.rank, len(items), info.world_size))
        mb = self.job.cfg.train.micro_batch
        return [torch.tensor(mine[s:s + mb]) for s in range(0, len(mine), mb)]


class SFTObjective(_ChatObjective):
    """Cross-entropy on assistant tokens only, a token-level mean over the whole global batch."""

    def next_batch(self):
        b = self.job.train_items[next(self.loader)].long().to(self.device, non_blocking=True)
        return b[:, 0], b[:, 1]

    def weight(self, batch):
        return (batch[1] != -100).sum()

    def loss(self, model, batch):
        with self.job.autocast():
            _, loss = model(batch[0], batch[1])
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, step: int):
        if self.job.val_items is None or len(self.job.val_items) == 0:
            return None
        model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        for rows in self._held_out_rows():
            b = self.job.val_items[rows].long()
            inp, tgt = b[:, 0].to(self.device), b[:, 1].to(self.device)
            with self.job.autocast():
                logits = model(inp)
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100,
                                 reduction="sum")
            acc += torch.stack([ce.double(), (tgt != -100).sum().double()])
        all_reduce_(acc, self.job.info)
        out = {"val_loss": float(acc[0] / acc[1]), "val_tokens": int(acc[1])}
        return out, f"held-out at step {step}: assistant-token loss {out['val_loss']:.4f} ({out['val_tokens']:,} tokens)"


class DPOObjective(_ChatObjective):
    """The DPO loss against a frozen reference (a model, or the adapters switched off), per pair."""

    metric_names = ("loss", "reward_margin", "reward_accuracy", "logp_margin")

    def __init__(self, job, loader, tokenizer, reference) -> None:
        super().__init__(job, loader, tokenizer)
        self.reference = reference

    def _pairs(self, idx, items):
        from tinyllama.finetune.chat_data import preference_batch

        inp, tgt = preference_batch(self.tokenizer, [items[int(i)] for i in idx], self.job.seq_len,
                                    self.tokenizer.eos_id)
        return inp.to(self.device), tgt.to(self.device)

    def next_batch(self):
        return self._pairs(next(self.loader), self.job.train_items)

    def loss(self, model, batch):
        from tinyllama.finetune.lora import adapters_disabled

        inputs, targets = batch
        n = inputs.size(0) // 2
        with self.job.autocast():
            pol = masked_logps(model, inputs, targets)
            with torch.no_grad():
                if self.reference == "adapters-off":
                    with adapters_disabled(model):
                        refl = masked_logps(model, inputs, targets)
                else:
                    refl = masked_logps(self.reference, inputs, targets)
        losses, rc, rr = dpo_loss(pol[:n], pol[n:], refl[:n], refl[n:], self.job.cfg.dpo.beta,
                                  self.job.cfg.dpo.label_smoothing)
        return losses.mean(), {"reward_margin": (rc - rr).mean(), "reward_accuracy": (rc > rr).float().mean(),
                               "logp_margin": (pol[:n] - pol[n:]).detach().mean()}

    @torch.no_grad()
    def evaluate(self, model, step: int):
        items = self.job.val_items
        if items is None or len(items) == 0:
            return None
        model.eval()
        acc = torch.zeros(5, dtype=torch.float64, device=self.device)
        for rows in self._held_out_rows():
            batch = self._pairs(rows, items)
            loss, m = self.loss(model, batch)
            k = batch[0].size(0) // 2
            acc += torch.stack([loss.double(), m["reward_margin"].double(), m["reward_accuracy"].double(),
                                m["logp_margin"].double(), torch.ones((), dtype=torch.float64, device=self.device)]) * k
        all_reduce_(acc, self.job.info)
        c = float(acc[4])
        out = {"val_loss": float(acc[0]) / c, "val_reward_margin": float(acc[1]) / c,
               "val_reward_accuracy": float(acc[2]) / c, "val_logp_margin": float(acc[3]) / c, "val_pairs": int(c)}
        return out, (f"held-out at step {step}: DPO loss {out['val_loss']:.4f} | reward margin "
                     f"{out['val_reward_margin']:.4f} | reward accuracy {out['val_reward_accuracy']:.3f} ({int(c)} pairs)")


# ---- the fine-tuning job ------------------------------------------------------------------------------
class FinetuneTrainer:
    """A fine-tuning run: loads the base model (LoRA, int8/int4, FSDP2), the chat data and the objective,
    runs the one loop (`tinyllama.train.loop`) and exports the result."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False, progress_stream=None) -> None:
        from tinyllama.train.distributed import init_distributed

        cfg.validate()
        self.cfg, self.resume = cfg, resume
        self.info = init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.out_dir)
        self.progress = Progress(self.info.is_main, live=cfg.train.progress, stream=progress_stream)
        self.compute_dtype = resolve_compute_dtype(cfg.train.dtype, self.info.device)
        self.lora = cfg.lora.enabled

    def autocast(self):
        return autocast(self.info.device, self.compute_dtype, self.fsdp)

    # -- model ---------------------------------------------------------------------------------------
    def _load(self, path: str):
        from tinyllama.hub import check_model_dir
        from tinyllama.model import Llama

        check_model_dir(path, "--model" if path == self.cfg.model.path else "--reference")
        # LoRA keeps the frozen base in the compute dtype (bf16 where native, see train.dtype); full fine-tuning
        # keeps fp32 master weights.
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

    def _grad_sync(self, params):
        """Replicated LoRA adapters on several processes: average their gradients (they are small)."""
        def sync() -> None:
            for p in params:
                if p.grad is not None:
                    all_reduce_(p.grad, self.info)
                    p.grad /= self.info.world_size
        return sync

    # -- main ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        from tinyllama.hub import resolve_model_path
        from tinyllama.tokenizer import Tokenizer
        from tinyllama.train.checkpoint import CheckpointManager
        from tinyllama.train.optim import build_optimizer, lr_at
        from tinyllama.train.trainer import model_num_params

        cfg, t, info = self.cfg, self.cfg.train, self.info
        mp = resolve_model_path(cfg.model.path)  # a Hub id `org/name` too (from_pretrained resolves it alike)
        tokenizer = Tokenizer(mp) if any((mp / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else Tokenizer()
        model = self.build_model()
        ref = self.build_reference(model)
        loader = self.build_data(tokenizer)
        accum = t.grad_accum(info.world_size)
        n_items = len(self.train_items)
        max_steps = t.max_steps or max(1, math.ceil(t.epochs * n_items / t.global_batch))
        if cfg.optim.max_steps is None:
            cfg.optim.max_steps = max_steps
        if cfg.optim.warmup_steps < 0:
            cfg.optim.warmup_steps = int(0.1 * max_steps)
        optimizer = build_optimizer(model, cfg.optim)  # no compute_dtype: no weight copies here
        if cfg.optim.compute_copies is True:
            self.progress.print("note: optim.compute_copies applies to pretraining (tinyllama pretrain); off here")
        objective = (SFTObjective(self, loader, tokenizer) if cfg.kind == "sft"
                     else DPOObjective(self, loader, tokenizer, ref))
        if cfg.kind == "sft":
            objective.tokens_per_step = t.global_batch * self.seq_len
        lora_params = [p for p in model.parameters() if p.requires_grad] if self.lora else []
        ckpt = CheckpointManager(self.out_dir, info, t.keep_last, t.keep_every,
                                 use_async=t.async_checkpoint and info.device.type == "cuda")
        loop = TrainLoop(model=model, optimizer=optimizer, objective=objective, info=info, cfg=t, max_steps=max_steps,
                         accum=accum, lr_at=lambda step: lr_at(step, cfg.optim), grad_clip=cfg.optim.grad_clip,
                         ckpt=ckpt, metrics=None, progress=self.progress, checkpoint_meta=self._checkpoint_meta,
                         grad_sync=self._grad_sync(lora_params) if lora_params and info.is_distributed else None)
        resumed_from = None
        if self.resume:
            resumed_from = ckpt.resume_point(self.progress.print)  # skips a damaged newest checkpoint, with a warning
            if resumed_from is None:
                self.progress.print(f"no checkpoint in {ckpt.root}; starting from the base model")
            else:
                loop.restore(resumed_from)
                self.progress.print(f"resumed from {resumed_from} (step {loop.state.step})")
        elif ckpt.latest() is not None:
            raise TinyLlamaError(f"{ckpt.root} already holds checkpoints; pass --resume to continue, or choose another --out")
        loop.metrics = MetricsLog.for_run(t, info.is_main, loop.state.step if resumed_from else None, cfg.to_dict(),
                                          self.progress.print)
        if info.is_main:
            import yaml

            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora_note = (f" (LoRA r={cfg.lora.r}{', ' + cfg.lora.quantize + ' base' if cfg.lora.quantize else ''})"
                     if self.lora else "")
        self.progress.print(
            f"{cfg.kind}: {self.model_cfg.name} from {cfg.model.path} | {n_train / 1e6:.2f} M trainable of "
            f"{model_num_params(model) / 1e6:.1f} M{lora_note} | {n_items} "
            f"{'blocks of %d tokens' % self.seq_len if cfg.kind == 'sft' else 'pairs'} | {max_steps} steps of "
            f"{t.global_batch} | device {info.device}{' × %d' % info.world_size if info.is_distributed else ''}")
        try:
            result = loop.run()
        finally:
            loop.metrics.close()
        result.update(out_dir=str(self.out_dir), trainable_params=n_train, seconds=result["session_s"])
        if resumed_from is not None:
            result["resumed_from"] = str(resumed_from)
        if not result["stop_reason"]:
            del result["stop_reason"]
            self._export(model, tokenizer, result)
        return result

    def _checkpoint_meta(self, state) -> dict:
        return {"step": state.step, "kind": self.cfg.kind, "model": self.model_cfg.to_dict(),
                "run": self.cfg.to_dict(), "world_size": self.info.world_size, "torch": torch.__version__}

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
