"""`tinyllama bench train`: our full training step against the `transformers` baseline, in one process.

Each variant runs the same step: forward under bf16 autocast (fp32 master weights), backward, global
grad-norm clipping at 1.0, fused AdamW (on CUDA), on the same token batches. Our variants clip the way the
trainer does (the clip factor applied inside fused AdamW); the baselines with `clip_grad_norm_`. Ours is tinyllama's model
with the kernel fast path (`tinyllama.kernels.apply_fast_path`); the baseline is Hugging Face's
LlamaForCausalLM with the same config and SDPA attention, eager and `torch.compile`d.
Reports tokens/s, model FLOPs utilisation (MFU), peak GPU memory, and our ratio to each baseline.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from tinyllama.checks import POSITIVE
from tinyllama.cli import _args as flag
from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError, pip_extra
from tinyllama.train.optim import FUSED_KERNELS, OptimConfig

# Dense bf16 tensor-core peak of one H100 SXM (the MFU denominator).
H100_BF16_TFLOPS = 989.0

# hf-liger patches transformers' Llama functions module-wide (rotary), so it always runs after the other hf ones.
VARIANTS = ("ours", "ours-compiled", "reference", "hf-eager", "hf-compile", "hf-liger")


@dataclass
class BenchResult:
    variant: str
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    peak_gb: float = float("nan")  # max_memory_allocated, 1e9 bytes
    step_ms: float = float("nan")
    final_loss: float = float("nan")
    error: Optional[str] = None
    details: dict = field(default_factory=dict)


# ---- config and data ---------------------------------------------------------------------------


def load_model_config(spec: str) -> ModelConfig:
    """A preset name (tinyllama-1.1b) or a config.json path (ours or Hugging Face's)."""
    from tinyllama.config import PRESETS

    if spec in PRESETS:
        return ModelConfig.from_name(spec)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix in (".yaml", ".yml") and p.is_file():
        import yaml

        d = yaml.safe_load(p.read_text()) or {}
        d = d.get("model", d)
        if isinstance(d, str):
            return ModelConfig.from_name(d)
        if isinstance(d, dict) and "name" in d and len(d) == 1:
            return ModelConfig.from_name(d["name"])
        return ModelConfig.from_dict(d)
    if p.is_file():
        return ModelConfig.from_json(p)
    raise TinyLlamaError(f"--config '{spec}': neither a model preset ({', '.join(sorted(PRESETS))}) nor a config file")


class TokenBatches:
    """Batches of (B, T+1) tokens: synthetic (the trainer's SyntheticLoader) or prepared tokens, read in order.

    Prepared tokens: a dataset directory from `tinyllama prepare` (its train split), LITPKDS .bin file(s),
    or a flat .npy of token ids (as `perf/make_tokens.py` writes). Reading wraps around at the end.
    """

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, data: Optional[str] = None, seed: int = 0):
        self.seq_len, self.batch_size, self.vocab_size = seq_len, batch_size, vocab_size
        self.source = None  # callable (start, length) -> int64 tensor
        self.n_tokens = 0
        self.loader = None
        self.pos = 0
        if data:
            import numpy as np

            p = Path(data)
            if not p.exists():
                raise TinyLlamaError(f"--data {data}: not found (a `tinyllama prepare` directory, LITPKDS .bin or .npy)")
            if p.suffix == ".npy":
                arr = np.load(p, mmap_mode="r")
                self.n_tokens = int(arr.size)
                top = int(arr.max()) if arr.size else 0
                self.source = lambda start, n: torch.from_numpy(np.asarray(arr[start : start + n], dtype=np.int64))
            else:
                from tinyllama.data.shards import TokenSource

                src = TokenSource(p, "train")
                self.n_tokens = src.num_tokens
                top = int(src.read(0, min(src.num_tokens, 1 << 20)).max()) if src.num_tokens else 0
                self.source = lambda start, n: torch.from_numpy(src.read(start, n))
            if self.n_tokens < seq_len + 1:
                raise TinyLlamaError(f"--data {data}: {self.n_tokens} tokens, fewer than one sequence of {seq_len + 1}")
            if top >= vocab_size:
                raise TinyLlamaError(f"--data {data}: token id {top} is outside the model's vocabulary of {vocab_size}")
        else:
            try:
                from tinyllama.train.synthetic import SyntheticLoader

                self.loader = SyntheticLoader(vocab_size, seq_len, batch_size, seed=seed)
            except ImportError:
                self.gen = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        self.pos = 0
        if self.loader is not None:
            self.loader.blocks_consumed = 0

    def next(self) -> torch.Tensor:
        B, T = self.batch_size, self.seq_len
        if self.source is not None:
            rows = []
            for _ in range(B):
                if self.pos + T + 1 > self.n_tokens:
                    self.pos = 0
                rows.append(self.source(self.pos, T + 1))
                self.pos += T + 1
            return torch.stack(rows)
        if self.loader is not None:
            return next(self.loader)
        return torch.randint(0, self.vocab_size, (B, T + 1), generator=self.gen)


# ---- the step ------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, lr: float = 4e-4, warmup_steps: int = 0, max_steps: Optional[int] = None,
                    fused_kernel: str = "torch", compute_copies: bool = False):
    """The trainer's AdamW (decay on matrices, fused on CUDA, by `fused_kernel` as optim.fused_kernel says,
    with bf16 weight copies as optim.compute_copies), with its lr schedule helper."""
    from tinyllama.train.optim import build_optimizer as _build, lr_at, set_lr

    cfg = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps, max_steps=max_steps,
                      fused_kernel=fused_kernel, compute_copies=compute_copies)
    on_cuda = any(p.is_cuda for p in model.parameters())
    opt = _build(model, cfg, torch.bfloat16 if on_cuda else None)  # make_train_step's autocast

    def schedule(step: int) -> None:
        set_lr(opt, lr_at(step, cfg))

    return opt, schedule


def make_train_step(model, optimizer, loss_of: Callable, device: torch.device, grad_clip: float = 1.0,
                    trainer_step: bool = False, cuda_graph: bool = False):
    """One optimizer step on a (B, T+1) token batch: forward + loss, backward, clip, AdamW, zero grads.

    trainer_step: clip the way `tinyllama pretrain` does (`clip_or_step_on_device`: the clip factor goes
    into fused AdamW as its grad_scale, one pass over the gradients less); otherwise `clip_grad_norm_`,
    as Hugging Face users (and its Trainer) do. cuda_graph (with trainer_step): the step replayed from one
    CUDA graph after two eager steps (`tinyllama.train.graph`, as `train.cuda_graph` runs it).
    """
    from tinyllama.train.optim import clip_or_step_on_device

    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def update(batch: torch.Tensor) -> tuple[torch.Tensor]:
        ids, targets = batch[:, :-1], batch[:, 1:]
        with autocast:
            loss = loss_of(model, ids, targets)
        loss.backward()
        if trainer_step:
            if not clip_or_step_on_device(optimizer, model, grad_clip, loss.detach())[1]:
                optimizer.step()
        else:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=device.type == "cuda")
            optimizer.step()
        return (loss.detach(),)

    if cuda_graph:
        from tinyllama.train.graph import GraphedStep, graph_problem

        problem = graph_problem(model, optimizer) or (None if trainer_step else "needs the trainer's step")
        if problem:
            raise TinyLlamaError(f"--cuda-graph {problem}")
        update = GraphedStep(update, optimizer)

    def step(batch: torch.Tensor) -> torch.Tensor:
        (loss,) = update(batch.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _ours_loss(model, ids, targets):
    return model(ids, targets)[1]


def build_ours(cfg: ModelConfig, device: torch.device, kernels=None, fast: bool = True, seed: int = 0):
    from tinyllama.kernels import KernelConfig, apply_fast_path
    from tinyllama.model import Llama

    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(cfg)
    if fast:
        apply_fast_path(model, kernels or KernelConfig())  # blocks are compiled on GPUs only by default
    return model


class MissingBaseline(RuntimeError):
    """A baseline whose package is not installed: reported in its row, the other variants still run."""


def build_hf(cfg: ModelConfig, device: torch.device, compile: bool = False, seed: int = 0, liger: bool = False):
    """transformers' LlamaForCausalLM (SDPA attention), optionally torch.compile'd or with Liger kernels
    (`apply_liger_kernel_to_llama`: RMSNorm, rotary, SwiGLU and fused linear cross-entropy, as HF/TRL users
    switch them on)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise MissingBaseline(f"transformers not installed ({pip_extra('hf')})") from None
    if liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError:
            raise MissingBaseline("liger_kernel not installed (pip install liger-kernel)") from None
    d = cfg.to_hf_dict()
    for k in ("architectures", "torch_dtype"):
        d.pop(k, None)
    hf_cfg = LlamaConfig(**d)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    model.train()
    if liger:
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    if compile:
        model = torch.compile(model)
    return model


def hf_loss(model, ids, targets):
    """Loss the way HF users train: `model(input_ids, labels=input_ids).loss` (HF shifts internally)."""
    return model(input_ids=ids, labels=ids).loss


# ---- measuring ---------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:
        pass


def measure(
    name: str,
    build: Callable[[], torch.nn.Module],
    loss_of: Callable,
    batches: TokenBatches,
    cfg: ModelConfig,
    device: torch.device,
    steps: int,
    warmup: int,
    peak_tflops: float,
    log: Callable[[str], None] = print,
    trainer_step: bool = False,
    cuda_graph: bool = False,
    adamw_kernel: str = "torch",
    compute_copies: bool = False,
) -> BenchResult:
    """Build a model, run warmup + timed steps, return throughput and peak memory (model and optimizer included)."""
    res = BenchResult(name)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = opt = step = None
    try:
        t0 = time.perf_counter()
        try:
            model = build()
        except MissingBaseline as e:
            res.error = str(e)
            return res
        opt, _ = build_optimizer(model, fused_kernel=adamw_kernel, compute_copies=compute_copies)
        if compute_copies:
            copies = getattr(opt, "copies", None)
            res.details["compute_copies_gb"] = round(copies.nbytes() / 1e9, 3) if copies is not None else None
        step = make_train_step(model, opt, loss_of, device, trainer_step=trainer_step, cuda_graph=cuda_graph)
        if cuda_graph:
            res.details["cuda_graph"] = True
        if adamw_kernel != "torch":
            res.details["adamw_kernel"] = adamw_kernel
        batches.reset()
        pool = [batches.next() for _ in range(min(steps + warmup, 16))]
        if device.type == "cuda":
            pool = [b.pin_memory() for b in pool]
        for i in range(warmup):
            loss = step(pool[i % len(pool)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        res.details["setup_and_warmup_s"] = round(time.perf_counter() - t0, 1)
        # each step's GPU time too (events between steps, no sync): a drift over the run shows clocks falling
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if device.type == "cuda" else []
        t1 = time.perf_counter()
        for i in range(steps):
            if events:
                events[i].record()
            loss = step(pool[(warmup + i) % len(pool)])
        if device.type == "cuda":
            events[-1].record()
            torch.cuda.synchronize()
            res.details["step_ms_each"] = [round(a.elapsed_time(b), 1) for a, b in zip(events, events[1:])]
        elapsed = time.perf_counter() - t1
        res.final_loss = float(loss)
        tokens = steps * batches.batch_size * batches.seq_len
        res.tokens_per_s = tokens / elapsed
        res.step_ms = 1000 * elapsed / steps
        res.mfu = res.tokens_per_s * cfg.flops_per_token(batches.seq_len) / (peak_tflops * 1e12)
        if device.type == "cuda":
            res.peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
        if not math.isfinite(res.final_loss):
            res.error = f"non-finite loss {res.final_loss}"
    except torch.cuda.OutOfMemoryError:
        res.error = "out of GPU memory"
    except Exception as e:  # one broken variant must not hide the others' numbers
        res.error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        del model, opt, step
        _free(device)
    log(_format_row(res))
    return res


def _format_row(r: BenchResult) -> str:
    if r.error and not math.isfinite(r.tokens_per_s):
        return f"{r.variant:<24} {'-':>10} {'-':>6} {'-':>8} {'-':>8} {'-':>7}  {r.error}"
    return (
        f"{r.variant:<24} {r.tokens_per_s:>10,.0f} {100 * r.mfu:>5.1f}% {r.peak_gb:>8.1f} {r.step_ms:>8.1f} "
        f"{r.final_loss:>7.3f}" + (f"  {r.error}" if r.error else "")
    )


HEADER = f"{'variant':<24} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'step ms':>8} {'loss':>7}"


def format_table(results: list[BenchResult]) -> str:
    lines = [HEADER] + [_format_row(r) for r in results]
    by = {r.variant: r for r in results}
    ours = [r for r in results if r.variant.startswith("ours") and math.isfinite(r.tokens_per_s)]
    for base in ("hf-eager", "hf-compile", "reference"):
        b = by.get(base)
        if b is None or not math.isfinite(b.tokens_per_s):
            continue
        for o in ours:
            mem = f", peak memory {o.peak_gb / b.peak_gb:.2f}×" if math.isfinite(o.peak_gb) and b.peak_gb > 0 else ""
            lines.append(f"{o.variant} / {base}: {o.tokens_per_s / b.tokens_per_s:.2f}× tokens/s{mem}")
    return "\n".join(lines)


def run_bench(
    cfg: ModelConfig,
    variants: list[str],
    micro_batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: torch.device,
    kernels=None,
    data: Optional[str] = None,
    peak_tflops: float = H100_BF16_TFLOPS,
    log: Callable[[str], None] = print,
    cuda_graph: bool = False,
    adamw_kernel: str = "torch",
    compute_copies: bool = False,
) -> list[BenchResult]:
    """cuda_graph, adamw_kernel, compute_copies: our variants' steps replayed from a CUDA graph, their fused AdamW
    by torch or Triton, with bf16 weight copies written by it (the baselines run as their users run them: torch's
    fused AdamW, eager)."""
    from tinyllama.kernels import KernelConfig

    if seq_len > cfg.max_seq_len:
        raise TinyLlamaError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    batches = TokenBatches(cfg.vocab_size, seq_len, micro_batch, data=data)
    builders = {
        "ours": (lambda: build_ours(cfg, device, kernels, fast=True), _ours_loss),
        "ours-compiled": (lambda: build_ours(cfg, device, replace(kernels or KernelConfig(), fused_blocks=False,
                                                                  compile_blocks=True), fast=True), _ours_loss),
        "reference": (lambda: build_ours(cfg, device, fast=False), _ours_loss),
        "hf-eager": (lambda: build_hf(cfg, device, compile=False), hf_loss),
        "hf-compile": (lambda: build_hf(cfg, device, compile=True), hf_loss),
        "hf-liger": (lambda: build_hf(cfg, device, liger=True), hf_loss),
    }
    variants = sorted(variants, key=lambda v: v == "hf-liger")
    log(HEADER)
    results = []
    for v in variants:
        build, loss_of = builders[v]
        results.append(measure(v, build, loss_of, batches, cfg, device, steps, warmup, peak_tflops, log=log,
                               trainer_step=not v.startswith("hf-"), cuda_graph=cuda_graph and v.startswith("ours"),
                               adamw_kernel=adamw_kernel if v.startswith("ours") else "torch",
                               compute_copies=compute_copies and v.startswith("ours")))
    return results


# ---- command line ------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--config", default="tinyllama-1.1b", help="model preset or config.json/yaml path (default tinyllama-1.1b)")
    p.add_argument("--micro-batch", type=flag.positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=flag.positive_int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--steps", type=flag.positive_int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=flag.nonnegative_int, default=3, help="untimed steps first (compilation happens here; default 3)")
    p.add_argument("--variants", default="ours,hf-eager,hf-compile",
                   help=f"comma-separated, from {','.join(VARIANTS)} (reference = our model without the fast path; "
                   "ours-compiled = ours with each block torch.compile'd instead of the fused blocks)")
    p.add_argument("--data", default=None,
                   help="prepared tokens: a `tinyllama prepare` directory, LITPKDS .bin, or .npy of ids (default: synthetic)")
    p.add_argument("--device", type=flag.device, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--peak-tflops", type=flag.positive_float, default=H100_BF16_TFLOPS, help="MFU denominator (default 989, H100 bf16 dense)")
    p.add_argument("--attention-backend", default="auto", help="attention for ours: auto|flash|cudnn|efficient|math (SDPA) or fa4 (flash-attn-4)")
    p.add_argument("--no-compile-blocks", action="store_true", help="ours without per-block torch.compile")
    p.add_argument("--no-fused-ce", action="store_true", help="ours with the plain head + cross-entropy")
    p.add_argument("--triton", action="store_true", help="ours with the eager Triton kernels (implies --no-compile-blocks)")
    p.add_argument("--fuse-projections", action="store_true", help="ours with one q/k/v and one gate/up GEMM")
    p.add_argument("--no-fused-blocks", action="store_true",
                   help="ours without the fused training blocks (then each block is torch.compile'd, or eager)")
    p.add_argument("--fp32-residual", action="store_true", help="ours with the residual stream in fp32")
    p.add_argument("--activation-memory-budget", type=flag.number(**POSITIVE, hi=1), default=1.0,
                   help="ours: compile partitioner's activation budget in (0, 1] (default 1.0)")
    p.add_argument("--ce-chunk-rows", type=flag.positive_int, default=None, help="rows per fused cross-entropy chunk")
    p.add_argument("--cuda-graph", action="store_true",
                   help="ours: replay each step from one CUDA graph after two eager steps (train.cuda_graph)")
    p.add_argument("--adamw-kernel", choices=FUSED_KERNELS, default="torch",
                   help="ours: fused AdamW by torch (default) or by tinyllama's Triton kernel (optim.fused_kernel)")
    p.add_argument("--compute-copies", nargs="?", choices=("auto", "on", "off"), const="on", default="auto",
                   help="ours: bf16 weight copies written by the Triton AdamW, not cast each forward "
                   "(optim.compute_copies; auto, the default: on with --adamw-kernel triton)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args) -> int:
    from tinyllama.kernels import KernelConfig

    cfg = load_model_config(args.config)
    if args.compute_copies == "on" and args.adamw_kernel != "triton":
        raise TinyLlamaError("--compute-copies needs --adamw-kernel triton (the kernel writes the copies)")
    # resolved as optim.compute_copies is (auto = unset)
    compute_copies = OptimConfig(fused_kernel=args.adamw_kernel, compute_copies={
        "auto": None, "on": True, "off": False}[args.compute_copies]).wants_copies()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise TinyLlamaError(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernels = KernelConfig(
        fused_cross_entropy=not args.no_fused_ce,
        ce_chunk_rows=args.ce_chunk_rows,
        compile_blocks=False if (args.no_compile_blocks or args.triton) else None,
        triton_kernels=args.triton,
        attention_backend=args.attention_backend,
        fuse_projections=args.fuse_projections,
        fused_blocks=False if args.no_fused_blocks else None,
        bf16_residual=not args.fp32_residual,
        activation_memory_budget=args.activation_memory_budget,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"bench train: {cfg.name} ({cfg.num_params() / 1e9:.3f} B params), micro-batch {args.micro_batch} × {args.seq_len}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, on {name}; torch {torch.__version__}; "
        f"MFU at {args.peak_tflops:g} TFLOP/s, {cfg.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token"
    )
    print(f"ours: {kernels}, AdamW by {args.adamw_kernel}" + (" with bf16 weight copies" if compute_copies else "")
          + (", step in a CUDA graph" if args.cuda_graph else ""))
    results = run_bench(cfg, variants, args.micro_batch, args.seq_len, args.steps, args.warmup, device, kernels,
                        args.data, args.peak_tflops, cuda_graph=args.cuda_graph, adamw_kernel=args.adamw_kernel,
                        compute_copies=compute_copies)
    print()
    print(format_table(results))
    if args.json:
        out = {"device": name, "torch": torch.__version__, "config": cfg.name, "micro_batch": args.micro_batch,
               "seq_len": args.seq_len, "steps": args.steps, "kernels": asdict(kernels),
               "cuda_graph": args.cuda_graph, "adamw_kernel": args.adamw_kernel, "compute_copies": compute_copies,
               "results": [asdict(r) for r in results]}
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
    return 0 if all(r.error is None for r in results) else 1
