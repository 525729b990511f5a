"""Pretraining: one process or many (torchrun + FSDP2), on the one loop (`tinyllama.train.loop`).

`pretrain(cfg)` runs a whole job from a RunConfig and returns a summary dict. This file builds what the
loop runs (the model with its fast path and FSDP2, AdamW, the mixture loader, the objective) and finishes
the demo (Hugging Face export, unigram entropy, a sample). Beside it: loop.py (the steps), config.py (what
to run), distributed.py (where), checkpoint.py (what survives), optim.py (how to step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from tinyllama.errors import TinyLlamaError
from tinyllama.model import Llama
from tinyllama.train.checkpoint import CheckpointManager, resolve_checkpoint
from tinyllama.train.config import RunConfig
from tinyllama.train.distributed import (
    DistInfo,
    all_reduce_,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    barrier,
    init_distributed,
)
from tinyllama.train.loop import OOM_ADVICE, Objective, TrainLoop, autocast, resolve_compute_dtype  # noqa: F401
from tinyllama.train.metrics import MetricsLog, Progress
from tinyllama.train.optim import build_optimizer, lr_at


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device, for MFU; None when unknown (e.g. a CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
                        ("L40S", 362.0), ("4090", 165.0)):
        if key in name:
            return tflops * 1e12
    return None


# ---- data ------------------------------------------------------------------------------------------
def build_loaders(cfg: RunConfig, info: DistInfo, vocab_size: int):
    """(train loader, function making fresh validation loaders) for this rank. Validation is per source,
    `eval_blocks` split evenly across them, so each domain's loss is reported (e.g. the demo's prose and code)."""
    data, t = cfg.data, cfg.train
    if getattr(data, "sources", None) == "synthetic":
        from tinyllama.train.synthetic import SyntheticLoader

        seed = int(getattr(data, "seed", 0))
        train = SyntheticLoader(vocab_size, data.seq_len, t.micro_batch, seed=seed, rank=info.rank,
                                world_size=info.world_size)

        def make_val():
            per_rank = max(1, t.eval_blocks // info.world_size)
            return [("synthetic", SyntheticLoader(vocab_size, data.seq_len, min(t.micro_batch, per_rank), seed=seed,
                                                  rank=info.rank, world_size=info.world_size, split="val",
                                                  max_blocks=t.eval_blocks))]

        return train, make_val
    from tinyllama.data.config import build_train_loader, val_loaders

    data_root = t.data_root
    train = build_train_loader(data, t.micro_batch, info.rank, info.world_size, data_root)

    def make_val():
        return val_loaders(data, t.micro_batch, info.rank, info.world_size, data_root, max_blocks=t.eval_blocks)

    return train, make_val


def prepare_data(cfg: RunConfig, info: DistInfo, progress: Progress) -> Optional[dict]:
    """Prepare the embedded demo corpus once (rank 0) when the run asks for it."""
    if not uses_demo_corpus(cfg.data):
        return None
    from tinyllama.data.demo import ensure_demo_dataset

    paths = None
    if info.is_main:
        progress.print(f"demo corpus: {cfg.train.data_root} (tokenized on first use)")
        paths = ensure_demo_dataset(cfg.train.data_root)
    barrier(info)
    if not info.is_main:
        paths = ensure_demo_dataset(cfg.train.data_root)
    return paths


def unigram_entropy_nats(paths: dict, weights: Optional[dict] = None) -> float:
    """Entropy (nats) of the train split's token frequencies: the loss of the best context-free model."""
    import numpy as np

    from tinyllama.data.shards import TokenSource

    total = None
    for name, path in paths.items():
        src = TokenSource(path, "train")
        counts = None
        chunk = 1 << 22
        for start in range(0, src.num_tokens, chunk):
            toks = src.read(start, min(chunk, src.num_tokens - start))
            c = np.bincount(toks.astype(np.int64), minlength=32000)
            counts = c if counts is None else (np.pad(counts, (0, max(0, len(c) - len(counts)))) +
                                               np.pad(c, (0, max(0, len(counts) - len(c)))))
        p = counts / counts.sum()
        w = (weights or {}).get(name, 1.0)
        total = p * w if total is None else np.pad(total, (0, max(0, len(p) - len(total)))) + np.pad(
            p * w, (0, max(0, len(total) - len(p))))
    p = total / total.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ---- the pretraining job -------------------------------------------------------------------------------
class PretrainObjective(Objective):
    """Next-token cross-entropy on packed blocks; validation on the held-out split."""

    def __init__(self, train_loader, make_val, info: DistInfo, autocast_ctx, tokens_per_step: int) -> None:
        self.train_loader, self.make_val, self.info, self.autocast = train_loader, make_val, info, autocast_ctx
        self.tokens_per_step = tokens_per_step

    def next_batch(self):
        return next(self.train_loader).to(self.info.device, non_blocking=True)

    def loss(self, model, batch):
        with self.autocast():
            _, loss = model(batch[:, :-1], batch[:, 1:])
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, step: int):
        model.eval()
        parts = self.make_val()
        sums = torch.zeros(len(parts), 2, device=self.info.device, dtype=torch.float64)  # per source: nll, tokens
        try:
            for k, (_, loader) in enumerate(parts):
                for batch in loader:
                    batch = batch.to(self.info.device)
                    with self.autocast():
                        _, loss = model(batch[:, :-1], batch[:, 1:])
                    n = batch[:, 1:].numel()
                    sums[k, 0] += loss.double() * n
                    sums[k, 1] += n
        finally:
            for _, loader in parts:
                if hasattr(loader, "close"):
                    loader.close()
        all_reduce_(sums, self.info)
        total = sums.sum(0)
        if total[1] == 0:
            raise TinyLlamaError("validation split is empty: no held-out blocks; add data or lower --data.seq_len")
        val, n = float(total[0] / total[1]), int(total[1])
        ppl = math.exp(min(val, 80))
        values = {"val_loss": val, "val_ppl": ppl, "val_tokens": n}
        line = f"validation at step {step}: loss {val:.4f} | perplexity {ppl:,.2f} ({n:,} held-out tokens)"
        if len(parts) > 1:
            per = {name: float(sums[k, 0] / sums[k, 1]) for k, (name, _) in enumerate(parts) if sums[k, 1] > 0}
            values.update({f"val_loss_{name}": v for name, v in per.items()})
            line += " | " + ", ".join(f"{name} {v:.4f}" for name, v in per.items())
        return values, line

    def data_state(self) -> dict:
        return self.train_loader.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.train_loader.load_state_dict(state)

    def close(self) -> None:
        if hasattr(self.train_loader, "close"):
            self.train_loader.close()


class Trainer:
    """A pretraining run: builds the model (fast path, FSDP2), optimizer and loaders from a RunConfig, runs
    the one loop (`tinyllama.train.loop`) and finishes the demo (export, entropy, sample)."""

    def __init__(self, cfg: RunConfig, resume: bool = False, info: Optional[DistInfo] = None,
                 progress_stream=None) -> None:
        cfg.validate()
        self.cfg = cfg
        t = cfg.train
        self.info = info or init_distributed(t.device)
        self.model_cfg = cfg.model_config()
        self.seq_len = cfg.seq_len()
        self.accum = t.grad_accum(self.info.world_size)
        self.max_steps = t.max_steps or math.ceil(t.max_tokens / (t.global_batch * self.seq_len))
        if cfg.optim.max_steps is None:
            cfg.optim.max_steps = self.max_steps
        self.out_dir = Path(t.out_dir)
        self.progress = Progress(self.info.is_main, live=t.progress, stream=progress_stream)
        self.compute_dtype = resolve_compute_dtype(t.dtype, self.info.device)
        self.resume = resume
        self.fsdp = self.info.is_distributed

    def _build_model(self) -> Llama:
        t = self.cfg.train
        # The same seed on every rank: initial weights do not depend on the world size.
        torch.manual_seed(t.seed)
        with torch.device(self.info.device):
            model = Llama(self.model_cfg)
        fast = False
        if t.fast_kernels:
            try:
                from tinyllama.kernels import apply_fast_path
            except ImportError as e:
                self.progress.print(f"note: train.fast_kernels requested but tinyllama.kernels is unavailable ({e})")
            else:
                kernels = dict(t.kernels or {})
                if t.compile:  # train.compile with the fast path: compiled blocks, unless the kernels config says
                    kernels.setdefault("compile_blocks", True)
                model = apply_fast_path(model, kernels) or model
                fast = True
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if t.compile and not fast:  # the fast path compiles blocks itself (its compile_blocks setting)
            apply_compile(model)
        if self.fsdp:
            param_dtype = self.compute_dtype if self.compute_dtype != torch.float32 else None
            reduce_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[t.fsdp_reduce_dtype]
            apply_fsdp(model, self.info, param_dtype, t.hsdp_replicas, t.fsdp_reshard_after_forward, reduce_dtype)
        return model

    def _autocast(self):
        return autocast(self.info.device, self.compute_dtype, self.fsdp)

    def run(self) -> dict:
        cfg, t, info = self.cfg, self.cfg.train, self.info
        demo_paths = prepare_data(cfg, info, self.progress)
        model = self._build_model()
        optimizer = build_optimizer(model, cfg.optim, None if self.fsdp else self.compute_dtype)
        weight_copies = getattr(optimizer, "copies", None) is not None
        if cfg.optim.compute_copies is True and not weight_copies:
            self.progress.print("note: optim.compute_copies is off for this run: it needs one device, the fused "
                                "blocks, bf16 autocast and fp32 weights")
        train_loader, make_val = build_loaders(cfg, info, self.model_cfg.vocab_size)
        tokens_per_step = t.global_batch * self.seq_len
        objective = PretrainObjective(train_loader, make_val, info, self._autocast, tokens_per_step)
        ckpt = CheckpointManager(self.out_dir, info, t.keep_last, t.keep_every,
                                 use_async=t.async_checkpoint and info.device.type == "cuda")
        loop = TrainLoop(model=model, optimizer=optimizer, objective=objective, info=info, cfg=t,
                         max_steps=self.max_steps, accum=self.accum,
                         lr_at=lambda step: lr_at(t.lr_step_offset + step * t.lr_step_scale, cfg.optim),
                         grad_clip=cfg.optim.grad_clip, ckpt=ckpt, metrics=None, progress=self.progress,
                         checkpoint_meta=self._checkpoint_meta, flops_per_token=self.model_cfg.flops_per_token(self.seq_len),
                         peak_flops=peak_flops(info.device, t.peak_tflops), cuda_graph=t.cuda_graph)
        resumed_from = self._start(loop, ckpt)
        loop.metrics = MetricsLog.for_run(t, info.is_main, loop.state.step if resumed_from else None, cfg.to_dict(),
                                          self.progress.print)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(_yaml_dump(cfg.to_dict()))
        n_params = model_num_params(model)
        self.progress.print(
            f"model {self.model_cfg.name}: {n_params / 1e6:.1f} M parameters | device {info.device}"
            f"{f' × {info.world_size} (FSDP2)' if self.fsdp else ''} | {str(self.compute_dtype).replace('torch.', '')}"
            f" | batch {t.global_batch} × {self.seq_len} tokens = {t.micro_batch} × {info.world_size} ranks × "
            f"{self.accum} accumulation | {self.max_steps} steps"
            + (" | bf16 weight copies written by AdamW" if weight_copies else "")
        )
        try:
            result = loop.run()
        finally:
            loop.metrics.close()
            objective.close()
        result.update(resumed_from=str(resumed_from) if resumed_from else None, out_dir=str(self.out_dir),
                      params=n_params, weight_copies=weight_copies)
        if result.get("val_loss") is not None:
            result["val_ppl"] = math.exp(min(result["val_loss"], 80))
        if not result["stop_reason"]:
            del result["stop_reason"]
            self._finish(model, result, demo_paths)
        return result

    def _start(self, loop: TrainLoop, ckpt: CheckpointManager) -> Optional[Path]:
        """Resume (--resume), start from another run's weights (train.init_from), or start fresh."""
        t = self.cfg.train
        if self.resume:
            latest = ckpt.resume_point(self.progress.print)  # skips a damaged newest checkpoint, with a warning
            if latest is None:
                self.progress.print(f"no checkpoint in {ckpt.root}; starting from scratch")
                return None
            self._check_same_model(latest)
            loop.restore(latest)
            self.progress.print(f"resumed from {latest} (step {loop.state.step}, {loop.state.tokens:,} tokens)")
            return latest
        if t.init_from:
            src = resolve_checkpoint(t.init_from)
            self._check_same_model(src)
            ckpt.load(src, loop.model, loop.optimizer, load_optimizer=t.init_optimizer, load_rng=False)
            self.progress.print(f"initialised weights{' and optimizer' if t.init_optimizer else ''} from {src}")
        elif ckpt.latest() is not None:
            raise TinyLlamaError(
                f"{ckpt.root} already holds checkpoints; pass --resume to continue that run, or choose another --out"
            )
        return None

    def _checkpoint_meta(self, state) -> dict:
        return {"step": state.step, "tokens": state.tokens, "model": self.model_cfg.to_dict(),
                "run": self.cfg.to_dict(), "world_size": self.info.world_size, "torch": torch.__version__}

    def _check_same_model(self, path: Path) -> None:
        """DCP would load a subset of tensors silently (e.g. fewer layers): compare architectures first."""
        from tinyllama.train.checkpoint import read_meta

        saved = read_meta(path).get("model", {})
        mine = self.model_cfg.to_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k != "name" and saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TinyLlamaError(f"{path}: checkpoint holds a different model ({detail}); fix --model.* to match")

    def _finish(self, model, result: dict, demo_paths: Optional[dict]) -> None:
        """Export to Hugging Face, report entropy and print a sample (rank 0, after a complete run)."""
        t = self.cfg.train
        if not (t.export_hf or t.sample_prompt or t.report_unigram_entropy):
            return
        plain = gather_plain_model(model, self.model_cfg, self.info)
        if not self.info.is_main:
            return
        if t.report_unigram_entropy and demo_paths:
            weights = _source_weights(self.cfg.data) or {}
            h = unigram_entropy_nats({k: v for k, v in demo_paths.items() if k in weights}, weights)
            result["unigram_entropy"] = h
            if result.get("val_loss") is not None:
                gap = h - result["val_loss"]
                verdict = (f"{gap:.2f} nats below it: the model uses context" if gap > 0
                           else "not below it yet: train longer")
                self.progress.print(
                    f"validation loss {result['val_loss']:.3f} nats/token vs. unigram entropy of the training tokens "
                    f"{h:.3f} nats/token ({verdict})"
                )
        from tinyllama.tokenizer import Tokenizer

        tok = Tokenizer()
        if t.export_hf:
            hf_dir = Path(t.export_hf)
            hf_dir = hf_dir if hf_dir.is_absolute() else self.out_dir / hf_dir
            plain.save_pretrained(hf_dir, tokenizer=tok)
            result["hf_dir"] = str(hf_dir)
            self.progress.print(f"saved a Hugging Face model to {hf_dir} (try: tinyllama generate --model {hf_dir} "
                                f"--prompt \"...\")")
        if t.sample_prompt:
            from tinyllama.generate import generate

            ids = tok.encode(t.sample_prompt, bos=True)
            out = generate(plain.eval(), ids, max_new_tokens=t.sample_tokens, temperature=0.0)
            text = tok.decode(ids[1:] + out)
            result["sample"] = text
            self.progress.print(f"sample (greedy): {text}")


def uses_demo_corpus(data) -> bool:
    from tinyllama.data.config import DEMO_WEIGHTS, parse_sources

    sources = getattr(data, "sources", "synthetic")
    if sources == "synthetic":
        return False
    paths = getattr(data, "paths", {}) or {}
    return any(n in ("demo", *DEMO_WEIGHTS) and n not in paths and not Path(n).exists()
               for n, _ in parse_sources(sources))


def _source_weights(data) -> Optional[dict]:
    """Sampling weight of each demo part in this run's mixture (for the unigram entropy)."""
    from tinyllama.data.config import DEMO_WEIGHTS, parse_sources

    out: dict[str, float] = {}
    for n, w in parse_sources(data.sources):
        if n == "demo":
            for k, dw in DEMO_WEIGHTS.items():
                out[k] = out.get(k, 0.0) + w * dw
        elif n in DEMO_WEIGHTS:
            out[n] = out.get(n, 0.0) + w
    return out or None


def model_num_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel() if not hasattr(p, "full_tensor") else math.prod(p.shape)
    return n


def gather_plain_model(model, model_cfg, info: DistInfo) -> Optional[Llama]:
    """A plain fp32 CPU Llama holding the (possibly sharded) trained weights, on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    if not info.is_main:
        return None
    plain = Llama(model_cfg)
    plain.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return plain


def _yaml_dump(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def pretrain(cfg: RunConfig, resume: bool = False, progress_stream=None) -> dict:
    return Trainer(cfg, resume=resume, progress_stream=progress_stream).run()
