"""The pretraining loop: one process or many (torchrun + FSDP2), exact resume, fault handling.

`pretrain(cfg)` runs a whole job from a RunConfig and returns a summary dict. Everything that is
not the loop itself lives beside it: config.py (what to run), distributed.py (where), checkpoint.py
(what survives), optim.py (how to step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

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
from tinyllama.train.optim import build_optimizer, clip_or_step_on_device, lr_at, set_lr
from tinyllama.train.profiling import StepProfiler

OOM_ADVICE = (
    "out of GPU memory: lower --train.micro_batch (global_batch stays, gradient accumulation grows), "
    "turn on --train.activation_checkpointing true, or use more GPUs (FSDP2 shards weights and optimizer)"
)


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


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 0. A second signal aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens consumed (inputs, all ranks)
    skipped_steps: int = 0  # non-finite steps skipped in total
    consecutive_nonfinite: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions of this run
    best_val_loss: Optional[float] = None


class Progress:
    """Rank 0's live progress line (carriage return on a terminal, one line per log_every otherwise)."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False

    def update(self, text: str, force_line: bool = False) -> None:
        if not self.enabled:
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
        if self.enabled:
            self.end()
            print(text, file=self.stream, flush=True)


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class MetricsLog:
    """metrics.jsonl (rank 0) plus TensorBoard when installed; on resume, drops records past the checkpoint."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: Optional[int], tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            if resume_step is not None:
                for line in self.path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a kill -9
                    if rec.get("step", 0) <= resume_step:
                        keep.append(line)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# ---- data ------------------------------------------------------------------------------------------
def build_loaders(cfg: RunConfig, info: DistInfo, vocab_size: int):
    """(train loader, function making a fresh validation loader) for this rank."""
    data, t = cfg.data, cfg.train
    if getattr(data, "sources", None) == "synthetic":
        from tinyllama.train.synthetic import SyntheticLoader

        seed = int(getattr(data, "seed", 0))
        train = SyntheticLoader(vocab_size, data.seq_len, t.micro_batch, seed=seed, rank=info.rank,
                                world_size=info.world_size)

        def make_val():
            per_rank = max(1, t.eval_blocks // info.world_size)
            return SyntheticLoader(vocab_size, data.seq_len, min(t.micro_batch, per_rank), seed=seed, rank=info.rank,
                                   world_size=info.world_size, split="val", max_blocks=t.eval_blocks)

        return train, make_val
    from tinyllama.data.config import build_train_loader, val_loader

    data_root = t.data_root
    train = build_train_loader(data, t.micro_batch, info.rank, info.world_size, data_root)

    def make_val():
        return val_loader(data, t.micro_batch, info.rank, info.world_size, data_root, max_blocks=t.eval_blocks)

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


# ---- the loop ----------------------------------------------------------------------------------------
class Trainer:
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
        self.progress = Progress(t.progress and self.info.is_main, progress_stream)
        dev = self.info.device
        dtype = t.dtype if t.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
        self.compute_dtype = torch.bfloat16 if dtype in ("bfloat16", "bf16") else torch.float32
        self.resume = resume

    # -- building --------------------------------------------------------------------------------
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
        self.fsdp = self.info.is_distributed
        if self.fsdp:
            param_dtype = self.compute_dtype if self.compute_dtype != torch.float32 else None
            reduce_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[t.fsdp_reduce_dtype]
            apply_fsdp(model, self.info, param_dtype, t.hsdp_replicas, t.fsdp_reshard_after_forward, reduce_dtype)
        return model

    def _autocast(self):
        # Under FSDP2 the mixed-precision policy casts parameters; single-device bf16 uses autocast.
        if self.compute_dtype == torch.float32 or self.fsdp:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.compute_dtype)

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t, info = self.cfg, self.cfg.train, self.info
        demo_paths = prepare_data(cfg, info, self.progress)
        model = self._build_model()
        optimizer = build_optimizer(model, cfg.optim)
        train_loader, make_val = build_loaders(cfg, info, self.model_cfg.vocab_size)
        ckpt = CheckpointManager(self.out_dir, info, t.keep_last, t.keep_every,
                                 use_async=t.async_checkpoint and info.device.type == "cuda")
        state = TrainerState()

        resumed_from = None
        if self.resume:
            latest = ckpt.resume_point(self.progress.print)  # skips a damaged newest checkpoint, with a warning
            if latest is None:
                self.progress.print(f"no checkpoint in {ckpt.root}; starting from scratch")
            else:
                self._check_same_model(latest)
                saved = ckpt.load(latest, model, optimizer)
                state = TrainerState(**saved["trainer"])
                train_loader.load_state_dict(saved["loader"])
                resumed_from = latest
                self.progress.print(f"resumed from {latest} (step {state.step}, {state.tokens:,} tokens)")
        elif t.init_from:
            src = resolve_checkpoint(t.init_from)
            self._check_same_model(src)
            ckpt.load(src, model, optimizer, load_optimizer=t.init_optimizer, load_rng=False)
            self.progress.print(f"initialised weights{' and optimizer' if t.init_optimizer else ''} from {src}")
        elif ckpt.latest() is not None:
            raise TinyLlamaError(
                f"{ckpt.root} already holds checkpoints; pass --resume to continue that run, or choose another --out"
            )

        metrics = MetricsLog(self.out_dir, info.is_main, state.step if resumed_from else None, t.tensorboard)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(_yaml_dump(cfg.to_dict()))

        n_params = model_num_params(model)
        flops_tok = self.model_cfg.flops_per_token(self.seq_len)
        peak = peak_flops(info.device, t.peak_tflops)
        tokens_per_step = t.global_batch * self.seq_len
        self.progress.print(
            f"model {self.model_cfg.name}: {n_params / 1e6:.1f} M parameters | device {info.device}"
            f"{f' × {info.world_size} (FSDP2)' if self.fsdp else ''} | {str(self.compute_dtype).replace('torch.', '')}"
            f" | batch {t.global_batch} × {self.seq_len} tokens = {t.micro_batch} × {info.world_size} ranks × "
            f"{self.accum} accumulation | {self.max_steps} steps"
        )

        result: dict[str, Any] = {"stopped_by": None, "resumed_from": str(resumed_from) if resumed_from else None,
                                  "losses": [], "out_dir": str(self.out_dir)}
        last_val = None
        stop_reason = None
        t_session = time.perf_counter()
        window_t, window_tokens = time.perf_counter(), 0
        step_times: list[float] = []
        profiler = StepProfiler(self.out_dir, info.rank, t.profile_from_step, t.profile_steps, info.device)
        try:
            with StopRequest() as stop:
                model.train()
                while state.step < self.max_steps:
                    profiler.before_step(state.step)
                    t0 = time.perf_counter()
                    lr = lr_at(t.lr_step_offset + state.step * t.lr_step_scale, cfg.optim)
                    set_lr(optimizer, lr)
                    try:
                        loss_sum = torch.zeros((), device=info.device, dtype=torch.float32)
                        for _ in range(self.accum):
                            batch = next(train_loader).to(info.device, non_blocking=True)
                            inputs, targets = batch[:, :-1], batch[:, 1:]
                            with self._autocast():
                                _, loss = model(inputs, targets)
                            (loss / self.accum).backward()
                            loss_sum += loss.detach().float()
                        # One all-reduce (queued, no wait): the ranks' summed loss and whether any caught a signal
                        # (a signal that arrives after this point is acted on at the end of the next step). The
                        # flag is written by a fill kernel: torch.tensor(..., device=cuda) would copy from the
                        # host and wait for the GPU, the very sync this step avoids.
                        synced = torch.stack([loss_sum / self.accum, loss_sum.new_full((), float(stop.requested))])
                        synced = all_reduce_(synced, info)
                        # Fused AdamW (the default on CUDA): clip and skip on the device, then one host sync per
                        # step (below) instead of a sync before the optimizer step that would leave the GPU idle.
                        grad_norm, stepped_on_device = clip_or_step_on_device(optimizer, model, cfg.optim.grad_clip,
                                                                              synced[0])
                    except torch.OutOfMemoryError:
                        optimizer.zero_grad(set_to_none=True)
                        raise TinyLlamaError(OOM_ADVICE) from None
                    stats = torch.cat([synced, grad_norm.to(synced).view(1)]).cpu()
                    loss_f = float(stats[0]) / (info.world_size if info.is_distributed else 1)
                    stop_seen, gnorm_f = float(stats[1]) > 0, float(stats[2])
                    finite = math.isfinite(loss_f) and math.isfinite(gnorm_f)
                    if finite:
                        if not stepped_on_device:
                            optimizer.step()
                        state.consecutive_nonfinite = 0
                    else:  # a fused step saw found_inf and left weights, moments and its step count unchanged
                        state.skipped_steps += 1
                        state.consecutive_nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    state.tokens += tokens_per_step
                    dt = time.perf_counter() - t0
                    state.elapsed_s += dt
                    step_times.append(dt)
                    window_tokens += tokens_per_step
                    result["losses"].append(loss_f)

                    record = {"kind": "train", "step": state.step, "loss": loss_f, "lr": lr, "grad_norm": gnorm_f,
                              "tokens": state.tokens, "skipped": not finite}
                    if state.step % t.log_every == 0 or state.step == self.max_steps or not finite:
                        now = time.perf_counter()
                        tps = window_tokens / max(now - window_t, 1e-9)
                        window_t, window_tokens = now, 0
                        recent = step_times[-20:]
                        eta = (self.max_steps - state.step) * (sum(recent) / len(recent))
                        tps_dev = tps / info.world_size
                        mfu = tps_dev * flops_tok / peak if peak else None
                        record.update(tokens_per_s=tps, tokens_per_s_per_device=tps_dev, mfu=mfu)
                        line = (f"step {state.step}/{self.max_steps} | loss {loss_f:.4f} | lr {lr:.2e} | "
                                f"grad norm {gnorm_f:.3f} | {tps:,.0f} tok/s"
                                f"{f' | MFU {mfu:.1%}' if mfu is not None else ''} | ETA {_fmt_time(eta)}")
                        if not finite:
                            line += f" | NON-FINITE: step skipped ({state.skipped_steps} so far)"
                        self.progress.update(line, force_line=not finite)
                    metrics.write(record)
                    written = profiler.after_step(state.step)
                    if written:
                        self.progress.print(f"profile written: {written[0]} (trace) and {written[1].name} (table)")

                    if not finite:
                        too_many = state.consecutive_nonfinite > t.max_consecutive_nonfinite
                        if t.nonfinite_policy == "stop" or too_many:
                            stop_reason = (f"non-finite loss/gradient at step {state.step}"
                                           + (f" ({state.consecutive_nonfinite} in a row)" if too_many else "")
                                           + f"; policy '{t.nonfinite_policy}': checkpoint written, stopping")
                    if t.eval_every and state.step % t.eval_every == 0 and state.step < self.max_steps:
                        last_val = self._evaluate(model, make_val, state, metrics)
                    if stop_seen and stop_reason is None:
                        stop_reason = f"{stop.signal_name or 'signal'} received: checkpoint written, exiting"
                        result["stopped_by"] = stop.signal_name or "signal"
                    if stop_reason:
                        break
                    if t.save_every and state.step % t.save_every == 0 and state.step < self.max_steps:
                        self._save(ckpt, model, optimizer, train_loader, state)
                    ckpt.poll()

                self.progress.end()
                finished = state.step >= self.max_steps and stop_reason is None
                if finished:
                    last_val = self._evaluate(model, make_val, state, metrics)
                if t.save_final or stop_reason:
                    self._save(ckpt, model, optimizer, train_loader, state, block=True)
                ckpt.wait()
        finally:
            profiler.finish(state.step)
            self.progress.end()
            metrics.close()
            if hasattr(train_loader, "close"):
                train_loader.close()

        result.update(step=state.step, tokens=state.tokens, skipped_steps=state.skipped_steps,
                      session_s=time.perf_counter() - t_session, params=n_params, checkpoint=str(ckpt.latest()))
        self._throughput_summary(result, step_times, tokens_per_step, flops_tok, peak)
        if last_val is not None:
            result.update(val_loss=last_val, val_ppl=math.exp(min(last_val, 80)))
        if stop_reason:
            self.progress.print(stop_reason)
            result["stop_reason"] = stop_reason
            if result["stopped_by"] is None:
                result["stopped_by"] = "nonfinite"
            return result
        self._finish(model, result, demo_paths)
        return result

    # -- pieces ----------------------------------------------------------------------------------
    def _check_same_model(self, path: Path) -> None:
        """DCP would load a subset of tensors silently (e.g. fewer layers): compare architectures first."""
        from tinyllama.train.checkpoint import read_meta

        saved = read_meta(path).get("model", {})
        mine = self.model_cfg.to_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k != "name" and saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TinyLlamaError(f"{path}: checkpoint holds a different model ({detail}); fix --model.* to match")

    def _throughput_summary(self, result, step_times, tokens_per_step, flops_tok, peak) -> None:
        """Steady-state speed (first steps excluded: allocator warm-up, compilation) and peak memory."""
        info = self.info
        steady = step_times[min(len(step_times) - 1, max(2, len(step_times) // 5)):] if step_times else []
        if steady:
            tps_dev = tokens_per_step * len(steady) / sum(steady) / info.world_size
            result.update(tokens_per_s_per_device=tps_dev, mfu=tps_dev * flops_tok / peak if peak else None)
        if info.device.type == "cuda":
            mem = torch.tensor([float(torch.cuda.max_memory_allocated(info.device))], device=info.device)
            all_reduce_(mem, info, op=dist.ReduceOp.MAX if info.is_distributed else None)
            result["peak_memory_gib"] = float(mem) / 2**30
        if steady:
            mfu = result.get("mfu")
            mem = result.get("peak_memory_gib")
            self.progress.print(
                f"throughput: {result['tokens_per_s_per_device']:,.0f} tokens/s per device over the last "
                f"{len(steady)} steps" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                + (f" | peak memory {mem:.1f} GiB" if mem is not None else "")
            )

    @torch.no_grad()
    def _evaluate(self, model, make_val, state: TrainerState, metrics: MetricsLog) -> float:
        model.eval()
        loss_sum = torch.zeros(2, device=self.info.device, dtype=torch.float64)
        loader = make_val()
        try:
            for batch in loader:
                batch = batch.to(self.info.device)
                with self._autocast():
                    _, loss = model(batch[:, :-1], batch[:, 1:])
                n = batch[:, 1:].numel()
                loss_sum += torch.stack([loss.double() * n, torch.tensor(float(n), device=loss.device,
                                                                          dtype=torch.float64)])
        finally:
            if hasattr(loader, "close"):
                loader.close()
        all_reduce_(loss_sum, self.info)
        model.train()
        if loss_sum[1] == 0:
            raise TinyLlamaError("validation split is empty: no held-out blocks; add data or lower --data.seq_len")
        val = float(loss_sum[0] / loss_sum[1])
        ppl = math.exp(min(val, 80))
        metrics.write({"kind": "val", "step": state.step, "val_loss": val, "val_ppl": ppl,
                       "val_tokens": int(loss_sum[1])})
        self.progress.print(f"validation at step {state.step}: loss {val:.4f} | perplexity {ppl:,.2f} "
                            f"({int(loss_sum[1]):,} held-out tokens)")
        if state.best_val_loss is None or val < state.best_val_loss:
            state.best_val_loss = val
        return val

    def _save(self, ckpt: CheckpointManager, model, optimizer, loader, state: TrainerState, block=False) -> None:
        trainer_state = {"trainer": asdict(state), "loader": loader.state_dict(), "world_size": self.info.world_size}
        meta = {"step": state.step, "tokens": state.tokens, "model": self.model_cfg.to_dict(),
                "run": self.cfg.to_dict(), "world_size": self.info.world_size, "torch": torch.__version__}
        ckpt.save(state.step, model, optimizer, trainer_state, meta, block=block)

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
