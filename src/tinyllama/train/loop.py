"""The one training loop. Pretraining, SFT and DPO all run `TrainLoop`; what differs is the `Objective`.

Per step: `accum` micro-batches of forward + backward (each weighted by its share of the global batch),
one queued all-reduce of the step's metrics together with the stop flag (no host sync), the gradient
norm, clip and AdamW step on the device (fused AdamW skips a non-finite step itself), then one host read
of [metrics, stop flag, grad norm]. Around it, written once for every objective: the non-finite policy,
out-of-memory advice, validation, checkpoint/resume (DCP, atomic), the progress line, metrics, profiling
and stopping on SIGTERM/SIGINT as launchers send them (see `StopRequest`).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from tinyllama.errors import TinyLlamaError
from tinyllama.train.distributed import DistInfo, all_reduce_
from tinyllama.train.metrics import fmt_time
from tinyllama.train.optim import clip_or_step_on_device, set_lr
from tinyllama.train.profiling import StepProfiler

OOM_ADVICE = (
    "out of GPU memory: lower --train.micro_batch (global_batch stays, gradient accumulation grows), "
    "turn on --train.activation_checkpointing true, or use more GPUs (FSDP2 shards weights and optimizer)"
)


class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit 0.

    A signal often arrives more than once: sent to the process group, it reaches every rank and also
    torchrun, which forwards it to the ranks again (and `timeout`/SLURM may repeat SIGTERM). Repeats within
    `repeat_window_s` of the first are the same request, and SIGTERM never escalates (SIGKILL is the hard
    stop). A SIGINT later than that (a second Ctrl-C) stops at once: KeyboardInterrupt, no new checkpoint;
    the previous complete checkpoint is untouched and a half-written one is removed.
    """

    repeat_window_s = 1.0

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self.signal_name, self._first_at = True, signal.Signals(signum).name, now
        elif signum == signal.SIGINT and now - self._first_at > self.repeat_window_s:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """exc is a KeyboardInterrupt, or was raised while handling one, or wraps one (DCP's CheckpointException
    keeps each rank's exception in `failures`)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens consumed (inputs, all ranks)
    skipped_steps: int = 0  # non-finite steps skipped in total
    consecutive_nonfinite: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions of this run
    best_val_loss: Optional[float] = None


class Objective:
    """What a job trains for: its batches, its loss, its held-out metrics. Subclasses implement these.

    `metric_names[0]` is "loss"; `loss()` returns the micro-batch's mean loss and the other metrics (means
    over the same units). `weight(batch)` is the number of units (e.g. target tokens) the mean is over, or
    None when every micro-batch weighs the same: the loop then weights by 1/accum and needs no all-reduce
    of the weights. Metrics are weighted the same way, so logged values are means over the global batch.
    """

    metric_names: tuple[str, ...] = ("loss",)
    tokens_per_step: int = 0  # training tokens per optimizer step, all ranks (0: no tokens/s or MFU)

    def next_batch(self) -> Any:
        raise NotImplementedError

    def weight(self, batch) -> Optional[torch.Tensor]:
        return None

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self, model, step: int) -> Optional[tuple[dict, str]]:
        """Held-out metrics (all ranks take part) and the line to print, or None."""
        return None

    def data_state(self) -> dict:
        raise NotImplementedError

    def load_data_state(self, state: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class StepOutcome:
    metrics: dict[str, float]
    grad_norm: float
    finite: bool
    stop_seen: bool


class TrainLoop:
    """Runs `objective` on `model` from `state` to `max_steps`; see the module docstring for a step.

    `cfg` is a `LoopConfig` (pretraining's TrainConfig, fine-tuning's FTTrainConfig). `lr_at(step)` gives
    the learning rate of step+1. `checkpoint_meta(state)` is the human-readable meta.json of a checkpoint.
    `grad_sync()`, when given, runs after backward (replicated LoRA adapters average their gradients).
    """

    def __init__(self, *, model, optimizer, objective: Objective, info: DistInfo, cfg, max_steps: int, accum: int,
                 lr_at: Callable[[int], float], grad_clip: float, ckpt, metrics, progress,
                 checkpoint_meta: Callable[[TrainerState], dict], grad_sync: Optional[Callable[[], None]] = None,
                 flops_per_token: Optional[float] = None, peak_flops: Optional[float] = None,
                 cuda_graph: bool = False) -> None:
        self.model, self.optimizer, self.objective, self.info, self.cfg = model, optimizer, objective, info, cfg
        self.max_steps, self.accum, self.lr_at, self.grad_clip = max_steps, accum, lr_at, grad_clip
        self.ckpt, self.metrics, self.progress = ckpt, metrics, progress
        self.checkpoint_meta, self.grad_sync = checkpoint_meta, grad_sync
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.state = TrainerState()
        self.step_times: list[float] = []
        self.last_val: Optional[dict] = None
        self.graphed = self._graphed_step() if cuda_graph else None

    def _graphed_step(self):
        """train.cuda_graph: the step as one replayed CUDA graph (tinyllama.train.graph), where it can be one."""
        from tinyllama.train.graph import GraphedStep, graph_problem

        problem = graph_problem(self.model, self.optimizer)
        if problem is None and self.info.is_distributed:
            problem = "needs one process (FSDP2's collectives are not captured); run without it under torchrun"
        if problem is None and self.accum != 1:
            problem = (f"needs one micro-batch per optimizer step (train.global_batch = train.micro_batch × GPUs); "
                       f"this run accumulates {self.accum}")
        if problem is None and self.grad_sync is not None:
            problem = "does not take a gradient sync hook (replicated adapters)"
        if problem:
            raise TinyLlamaError(f"train.cuda_graph {problem}")

        def update(batch):
            sums = self._forward_backward([batch])
            grad_norm, stepped = clip_or_step_on_device(self.optimizer, self.model, self.grad_clip, sums[0])
            assert stepped  # fused AdamW: graph_problem checked it
            return sums, grad_norm

        return GraphedStep(update, self.optimizer)

    # ---- resume ----------------------------------------------------------------------------------
    def restore(self, path) -> None:
        saved = self.ckpt.load(path, self.model, self.optimizer)
        self.state = TrainerState(**saved["trainer"])
        self.objective.load_data_state(saved["loader"])

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train until max_steps, a stop signal or the non-finite policy; checkpoint; return a summary."""
        t, state = self.cfg, self.state
        result: dict[str, Any] = {"stopped_by": None, "losses": [], "stop_reason": None}
        profiler = StepProfiler(t.out_dir, self.info.rank, t.profile_from_step, t.profile_steps, self.info.device)
        window = [time.perf_counter(), 0]  # start time and tokens of the progress line's window
        t_session = time.perf_counter()
        try:
            with StopRequest() as stop:
                self.model.train()
                while state.step < self.max_steps and not result["stop_reason"]:
                    profiler.before_step(state.step)
                    t0 = time.perf_counter()
                    out = self._step(stop)
                    self._account(out, time.perf_counter() - t0, result)
                    self._report(out, window)
                    written = profiler.after_step(state.step)
                    if written:
                        self.progress.print(f"profile written: {written[0]} (trace) and {written[1].name} (table)")
                    self._decide_stop(out, stop, result)
                    if t.eval_every and state.step % t.eval_every == 0 and state.step < self.max_steps:
                        self._evaluate()
                    if result["stop_reason"]:
                        break
                    if t.save_every and state.step % t.save_every == 0 and state.step < self.max_steps:
                        self.save()
                    self.ckpt.poll()
                self.progress.end()
                if state.step >= self.max_steps and not result["stop_reason"]:
                    self._evaluate()
                if t.save_final or result["stop_reason"]:
                    self.save(block=True)
                self.ckpt.wait()
        except BaseException as exc:
            if not _caused_by_interrupt(exc):
                raise
            # A second Ctrl-C: the half-written checkpoint goes, the previous one stays. Code it lands in may
            # wrap it (DCP's save turns it into a CheckpointException), so it is re-raised as what it is.
            self.ckpt.abandon()
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from exc
        finally:
            profiler.finish(state.step)
            self.progress.end()
        result.update(step=state.step, tokens=state.tokens, skipped_steps=state.skipped_steps,
                      session_s=time.perf_counter() - t_session, checkpoint=str(self.ckpt.latest()))
        if self.last_val is not None:
            result.update(self.last_val)
        self._throughput_summary(result)
        if result["stop_reason"]:
            self.progress.print(result["stop_reason"])
            result["stopped_by"] = result["stopped_by"] or "nonfinite"
        return result

    def _step(self, stop: StopRequest) -> StepOutcome:
        """One optimizer step: forward/backward over the micro-batches, one all-reduce, clip + AdamW."""
        info = self.info
        set_lr(self.optimizer, self.lr_at(self.state.step))
        try:
            if self.graphed is not None:
                sums, grad_norm = self.graphed(self.objective.next_batch())
                synced, stepped = self._synced(sums, stop), True
            else:
                synced, grad_norm, stepped = self._reduce_and_update(stop)
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            raise TinyLlamaError(OOM_ADVICE) from None
        stats = torch.cat([synced, grad_norm.to(synced).view(1)]).cpu().tolist()
        n = len(self.objective.metric_names)
        metrics = {k: v / info.world_size for k, v in zip(self.objective.metric_names, stats[:n])}
        finite = math.isfinite(metrics["loss"]) and math.isfinite(stats[n + 1])
        if finite and not stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(metrics, stats[n + 1], finite, stats[n] > 0)

    def _reduce_and_update(self, stop: StopRequest) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Forward/backward, the queued all-reduce of metrics and stop flag, clip + AdamW: (synced, norm, stepped)."""
        synced = self._synced(self._forward_backward(), stop)
        if self.grad_sync is not None:
            self.grad_sync()
        # Fused AdamW (the default on CUDA): clip and skip on the device; the host reads once, in _step.
        grad_norm, stepped = clip_or_step_on_device(self.optimizer, self.model, self.grad_clip, synced[0])
        return synced, grad_norm, stepped

    def _synced(self, sums: torch.Tensor, stop: StopRequest) -> torch.Tensor:
        """[metric sums, stop flag] in one all-reduce (queued, no wait; nothing to reduce in one process): whether
        any rank caught a signal (one that arrives after this point is acted on at the end of the next step).
        The flag is written by a fill kernel: torch.tensor(..., device=cuda) would copy from the host and wait."""
        return all_reduce_(torch.cat([sums, sums.new_full((1,), float(stop.requested))]), self.info)

    def _forward_backward(self, batches: Optional[list] = None) -> torch.Tensor:
        """Backward of `accum` micro-batches (or of `batches`); returns this rank's weighted metric sums (device)."""
        obj, accum, dev = self.objective, self.accum, self.info.device
        batches = batches if batches is not None else [obj.next_batch() for _ in range(accum)]
        weights = [obj.weight(b) for b in batches]
        if weights[0] is not None and self.graphed is not None:
            raise TinyLlamaError("train.cuda_graph: this objective weights its micro-batches (a host copy per step); "
                                 "turn the graph off")
        if weights[0] is None:
            scales = [1.0 / accum] * accum
        else:  # a micro-batch's share of the global batch: its units over all ranks' units (times world size,
            # as gradients are averaged over ranks); the weights' all-reduce is queued, never waited on
            w = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in weights]).to(dev, non_blocking=True)
            total = all_reduce_(w.sum(), self.info)
            scales = list(w * (self.info.world_size / total))
        sums = None
        for batch, scale in zip(batches, scales):
            loss, extra = obj.loss(self.model, batch)
            (loss * scale).backward()
            vec = torch.stack([loss.detach().float()] + [extra[k].detach().float() for k in obj.metric_names[1:]])
            sums = vec * scale if sums is None else sums + vec * scale
        return sums

    def _account(self, out: StepOutcome, dt: float, result: dict) -> None:
        s = self.state
        if out.finite:
            s.consecutive_nonfinite = 0
        else:  # a fused step saw found_inf and left weights, moments and its step count unchanged
            s.skipped_steps += 1
            s.consecutive_nonfinite += 1
        s.step += 1
        s.tokens += self.objective.tokens_per_step
        s.elapsed_s += dt
        self.step_times.append(dt)
        result["losses"].append(out.metrics["loss"])

    def _report(self, out: StepOutcome, window: list) -> None:
        """metrics.jsonl every step; the progress line every log_every steps (and on a skipped step)."""
        s, tps = self.state, self.objective.tokens_per_step
        lr = self.lr_at(s.step - 1)
        record = {"kind": "train", "step": s.step, **out.metrics, "lr": lr, "grad_norm": out.grad_norm,
                  "tokens": s.tokens, "skipped": not out.finite}
        window[1] += tps
        if s.step % self.cfg.log_every == 0 or s.step == self.max_steps or not out.finite:
            now = time.perf_counter()
            rate = window[1] / max(now - window[0], 1e-9)
            window[0], window[1] = now, 0
            recent = self.step_times[-20:]
            eta = (self.max_steps - s.step) * (sum(recent) / len(recent))
            extra = "".join(f" | {k.replace('_', ' ')} {v:.4f}" for k, v in out.metrics.items() if k != "loss")
            line = f"step {s.step}/{self.max_steps} | loss {out.metrics['loss']:.4f}{extra} | lr {lr:.2e} | " \
                   f"grad norm {out.grad_norm:.3f}"
            if tps:
                per_dev = rate / self.info.world_size
                mfu = per_dev * self.flops_per_token / self.peak_flops if self.peak_flops and self.flops_per_token else None
                record.update(tokens_per_s=rate, tokens_per_s_per_device=per_dev, mfu=mfu)
                line += f" | {rate:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
            line += f" | ETA {fmt_time(eta)}"
            if not out.finite:
                line += f" | NON-FINITE: step skipped ({s.skipped_steps} so far)"
            self.progress.update(line, force_line=not out.finite)
        self.metrics.write(record)

    def _decide_stop(self, out: StepOutcome, stop: StopRequest, result: dict) -> None:
        s, t = self.state, self.cfg
        if not out.finite:
            too_many = s.consecutive_nonfinite > t.max_consecutive_nonfinite
            if t.nonfinite_policy == "stop" or too_many:
                result["stop_reason"] = (f"non-finite loss/gradient at step {s.step}"
                                         + (f" ({s.consecutive_nonfinite} in a row)" if too_many else "")
                                         + f"; policy '{t.nonfinite_policy}': checkpoint written, stopping")
        if out.stop_seen and not result["stop_reason"]:
            name = stop.signal_name or "signal"
            result["stop_reason"] = f"{name} received: checkpoint written, exiting"
            result["stopped_by"] = name

    # ---- pieces --------------------------------------------------------------------------------
    def _evaluate(self) -> None:
        got = self.objective.evaluate(self.model, self.state.step)
        self.model.train()
        if got is None:
            return
        values, line = got
        self.metrics.write({"kind": "val", "step": self.state.step, **values})
        self.progress.print(line)
        val = values.get("val_loss")
        if val is not None and (self.state.best_val_loss is None or val < self.state.best_val_loss):
            self.state.best_val_loss = val
        self.last_val = values

    def save(self, block: bool = False) -> None:
        trainer_state = {"trainer": asdict(self.state), "loader": self.objective.data_state(),
                         "world_size": self.info.world_size}
        self.ckpt.save(self.state.step, self.model, self.optimizer, trainer_state, self.checkpoint_meta(self.state),
                       block=block)

    def _throughput_summary(self, result: dict) -> None:
        """Steady-state speed (first steps excluded: allocator warm-up, compilation) and peak memory."""
        info, times, tps = self.info, self.step_times, self.objective.tokens_per_step
        steady = times[min(len(times) - 1, max(2, len(times) // 5)):] if times else []
        if steady and tps:
            per_dev = tps * len(steady) / sum(steady) / info.world_size
            mfu = per_dev * self.flops_per_token / self.peak_flops if self.peak_flops and self.flops_per_token else None
            result.update(tokens_per_s_per_device=per_dev, mfu=mfu)
        if info.device.type == "cuda":
            import torch.distributed as dist

            mem = torch.tensor([float(torch.cuda.max_memory_allocated(info.device))], device=info.device)
            all_reduce_(mem, info, op=dist.ReduceOp.MAX if info.is_distributed else None)
            result["peak_memory_gib"] = float(mem) / 2**30
        if steady and tps:
            mfu, mem = result.get("mfu"), result.get("peak_memory_gib")
            self.progress.print(
                f"throughput: {result['tokens_per_s_per_device']:,.0f} tokens/s per device over the last "
                f"{len(steady)} steps" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                + (f" | peak memory {mem:.1f} GiB" if mem is not None else "")
            )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates bf16 and it is
    slower than fp32, so `auto` stays fp32 there."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # a private torch API: its absence or failure only means "not known to be native"
        return False


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype -> the compute dtype. auto is bf16 autocast (fp32 master weights) where the hardware computes
    bf16 natively: a GPU, or a CPU with AVX512-BF16/AMX (~1.5x the fp32 tokens/s of the demo; litgpt also
    defaults to bf16-mixed on CPU); fp32 elsewhere."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        name = "bfloat16" if native else "float32"
    dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}.get(name)
    if dtype is None:
        raise TinyLlamaError(f"train.dtype must be auto, bfloat16 or float32, got {name!r}")
    return dtype


def autocast(device: torch.device, compute_dtype: torch.dtype, fsdp: bool):
    """bf16 autocast on one device; none in fp32 or under FSDP2 (its mixed-precision policy casts)."""
    import contextlib

    if compute_dtype == torch.float32 or fsdp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)
