"""Continuous-batching inference engine: a scheduler thread over a fixed set of KV-cache slots.

Every request is a `Sequence` that owns one slot (one row of every layer's key/value cache) from
admission to finish. The scheduler loop, in its own thread:
  1. admits waiting sequences into free slots and prefills them together (right-padded batch),
  2. runs ONE decode step for every running sequence at once, each at its own position,
  3. hands each new token to its sequence's consumer and frees the slots of finished sequences.
New requests therefore join the running batch between two decode steps instead of waiting for it
to drain (continuous batching, as in Orca / vLLM), and a finished one leaves without stopping others.

The slots are the rows of the model's own KV cache (`Llama.setup_cache(max_batch_size, ...)`), and every
pass is `Llama.forward` with per-row cache positions: the prefill writes its rows into their slots
(`slots=`), a decode step runs the cache's first B rows, each at its own position. B is the smallest
decode bucket holding the highest running slot (slots are handed out lowest first, so running rows stay
near the front); rows in it with no sequence are idle padding that writes position 0 of its own unused
cache row, which the next sequence there overwrites in its prefill before it can attend to it (with
overlap, a row sitting a step out is padding too: its sequence finishes in that step). With
`compile=True` (CUDA) the decode step is `DecodeEngine`'s: one CUDA graph per bucket (powers of two up to
max_batch_size), and buckets of up to 16 rows run the Triton decode step (`DecodeEngine`'s decode_kernels).

A prefill pass is `DecodeEngine.prefill` with the slots of the admitted rows: compiled and, from a shape's
second time on, replayed as a CUDA graph when compiling (prompt lengths padded to a few buckets for that).

Short prompts (up to `prefill_in_decode` tokens) that arrive while other sequences run can skip the separate
prefill pass: their tokens ride along in the decode steps, one per step, in the row their sequence already
owns, and the step that feeds the last prompt token samples the first new one. Into an idle engine every
prompt gets a prefill pass (nothing waits on it, and it beats a step per prompt token). On a GPU a compiled
decode step is bound by reading the weights, so a few more rows cost the running ones little, while a prefill
pass stalls them all (eager, as long as 10-20 such steps); longer prompts get their own prefill pass, admitted
together. On a CPU a step's cost grows with its rows and a short prefill costs about one step, so there it is
off by default.

With `overlap=True` the engine queues decode step N+1 before it reads step N's tokens: the tokens sampled in
step N go into step N+1 straight from the device, and while the GPU runs N+1 the host emits N's tokens and
prepares the next step. A row that stops at step N (EOS, a stop string, a cancel) has run one step more for
nothing and its slot frees a step later; rows that reach their length or the context are left out of N+1.
The tokens are the same as without overlap, but for a cancel: it drops the token of the step in flight (not
emitted yet, where without overlap it was emitted in that step).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq

import torch

from tinyllama.generate import DecodeEngine, SamplingConfig, SeededUniforms, host_to_device, sample_next
from tinyllama.model import Llama

log = logging.getLogger("tinyllama.serve")


@dataclass
class Sequence:
    """One generation request. `on_token(token_id)` and `on_finish(reason, error)` are called from the
    engine thread; they must be quick and thread-safe (the server forwards them to its event loop)."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    on_token: Callable[[int], None]
    on_finish: Callable[[str, Optional[str]], None]
    eos_id: Optional[int] = None
    # engine state
    slot: int = -1
    pos: int = 0  # where the next fed token is written in the slot's cache
    next_token: int = -1  # sampled (or the next prompt token), not yet fed to the model
    prompt_fed: int = -1  # prompt tokens fed so far while riding along in decode steps; -1 once prefilled
    generated: int = 0
    finished: bool = False
    cancelled: bool = False
    uniforms: Optional[SeededUniforms] = None  # the random stream of a seeded request
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Ask the engine to drop this sequence (client went away, stop string hit). Thread-safe."""
        self.cancelled = True


@dataclass
class _StepTokens:
    """One step's sampled tokens on their way to the host: the sequences in the order of `picked`, each one's
    cache position after the step, the tokens on the device and (CUDA) their pinned copy with its event."""

    seqs: list[Sequence]
    pos_after: list[int]
    picked: torch.Tensor
    host: Optional[torch.Tensor] = None
    ready: Optional["torch.cuda.Event"] = None

    def tokens(self) -> list[int]:
        if self.ready is None:
            return self.picked.tolist()
        self.ready.synchronize()  # waits without holding the GIL, so the server's event loop keeps running
        return self.host.tolist()


@dataclass
class EngineStats:
    decode_steps: int = 0
    decode_rows: int = 0  # sum over decode steps of the number of sequences in the step
    max_rows_in_step: int = 0
    prefills: int = 0
    prefill_rows: int = 0
    prompts_in_decode: int = 0  # prompts fed through decode steps instead of a prefill pass
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    errors: int = 0
    # Where the engine thread's time goes (seconds): inside `step` in all; of that, waiting for a step's tokens
    # to reach the host (with overlap the next step is already queued: the device is busy meanwhile), and in
    # prefill passes (each waits for its own tokens, and so, with overlap, for the step queued before it).
    # The rest of step_s is host work: while the device waits for it (without overlap, or when it outlasts a
    # step) the device idles.
    step_s: float = 0.0
    wait_s: float = 0.0
    prefill_s: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("step_s", "wait_s", "prefill_s"):
            d[k] = round(d[k], 4)
        d["mean_rows_per_decode_step"] = round(self.decode_rows / self.decode_steps, 3) if self.decode_steps else 0.0
        return d


class Engine:
    """Owns the model and its KV cache (one row per slot); `submit()` from any thread, `start()` runs the
    scheduler thread. The model is the engine's from now on: generating with it elsewhere (`generate`,
    `setup_cache`) would replace the cache under the running sequences.

    compile=True (CUDA only; eager elsewhere): decode steps run compiled and captured in CUDA graphs, one
    per decode bucket (`DecodeEngine(compile=True)`); fuse=True fuses the q/k/v and gate/up projections
    in place first (inference only; with compile, lets buckets of up to 16 rows run the Triton step, see
    `DecodeEngine`'s decode_kernels). decode_buckets: the batch sizes a decode step is padded to (default:
    powers of two and max_batch_size when compiling, else no padding). prefill_in_decode: prompts of at most
    this many tokens that arrive while others run are fed through decode steps instead of a prefill pass
    (module docstring; 0: never;
    default: 32 with compiled CUDA-graph decode steps, else 0). overlap: queue each decode step before
    reading the previous one's tokens (module docstring; default: on with compiled CUDA-graph decode steps,
    where it measured 11-18 % more tokens/s in `bench serve` on an H200, else off).
    """

    def __init__(self, model: Llama, max_batch_size: int = 16, max_seq_len: Optional[int] = None,
                 eos_id: Optional[int] = None, *, compile: bool = False, fuse: bool = False,
                 decode_kernels: str = "auto", decode_buckets: Optional[Seq[int]] = None,
                 prefill_in_decode: Optional[int] = None, overlap: Optional[bool] = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_in_decode is not None and prefill_in_decode < 0:
            raise ValueError(f"prefill_in_decode must be >= 0, got {prefill_in_decode}")
        self.model = model.eval()
        c = model.config
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or c.max_seq_len, c.max_seq_len)
        self.eos_id = c.eos_id if eos_id is None else eos_id
        self.decoder = DecodeEngine(model, compile=compile, fuse=fuse, decode_kernels=decode_kernels)
        self.device = self.decoder.device
        self.compile = self.decoder.compile
        self.prefill_in_decode = (32 if self.compile else 0) if prefill_in_decode is None else prefill_in_decode
        # Prefill passes padded to lengths 16, 32, ... 256, then multiples of 256, and to 1, 2, 4, ... rows
        # (compiled: `DecodeEngine.prefill` captures each (rows, length) in a CUDA graph; eager, padding would
        # only cost time)
        self.pad_prefills = self.compile
        self.decoder.max_prefill_graphs = 32  # (rows, padded length) shapes of a busy server
        self.decoder.ensure_cache(max_batch_size, self.max_seq_len)
        self._cache_mask = model.causal_mask  # replaced by any other setup_cache / clear_cache on the model
        if decode_buckets is None:
            decode_buckets = [1 << i for i in range(max_batch_size.bit_length())] if self.compile else \
                range(1, max_batch_size + 1)
        if any(not 1 <= b <= max_batch_size for b in decode_buckets):
            raise ValueError(f"decode_buckets must lie in 1..{max_batch_size}, got {list(decode_buckets)}")
        self.decode_buckets = sorted({*decode_buckets, max_batch_size})
        self.slots: list[Optional[Sequence]] = [None] * max_batch_size
        self.overlap = self.compile if overlap is None else overlap
        self._inflight: Optional[_StepTokens] = None  # with overlap: the queued step whose tokens are not read yet
        # Pinned buffers the tokens are copied into (CUDA), two so that step N+1's copy never lands on step N's.
        self._host_tokens = [torch.empty(max_batch_size, dtype=torch.long, pin_memory=True)
                             for _ in range(2)] if self.device.type == "cuda" else None
        self._host_turn = 0
        # (slot, V) bool: the tokens each slot's sequence has seen, for the repetition penalty (made when needed)
        self.seen: Optional[torch.Tensor] = None
        self._unseeded = SeededUniforms()  # numbers for unseeded rows sampled beside seeded ones (OS-seeded)
        self.waiting: "queue.Queue[Sequence]" = queue.Queue()
        self.stats = EngineStats()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()

    # ---- public ---------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        if not seq.prompt_ids:
            raise ValueError("empty prompt")
        if len(seq.prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the context of {self.max_seq_len}")
        if seq.eos_id is None:
            seq.eos_id = self.eos_id
        self.waiting.put(seq)
        self._wake.set()
        return seq

    @torch.inference_mode()
    def warmup(self) -> float:
        """Compile and capture every decode bucket and the prefill passes of every row count (1, 2, 4, ...
        max_batch_size) at the first length bucket now (compile=True), so no request waits for it; returns the
        seconds spent. Call it with no request running: the steps write position 0 of cache rows, the prefills
        the first positions of the first slots, which a request's prefill or first step overwrites before use."""
        if not self.compile:
            return 0.0
        t0 = time.perf_counter()
        for B in self.decode_buckets:
            ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            for _ in range(3):  # reduce-overhead mode records its CUDA graph on a later call than the first
                self.decoder.step(ids, torch.zeros(B, 1, dtype=torch.long, device=self.device), pos=0 if B == 1 else None)
        T = min(16, self.max_seq_len)  # the first length bucket; other shapes compile (dynamic) on first use
        for rows in sorted({self._prefill_rows(n) for n in range(1, self.max_batch_size + 1)}):
            for _ in range(2):  # run, then run + capture
                self.decoder.prefill(torch.zeros(rows, T, dtype=torch.long, device=self.device),
                                     slots=torch.arange(rows, device=self.device),
                                     logits_at=torch.full((rows,), T - 1, device=self.device))
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tinyllama-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- scheduler --------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                if self.running == 0 and self.waiting.empty() and self._inflight is None:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as e:  # a failed step must not take the server down: fail the batch, go on
                    log.exception("engine step failed")
                    self.stats.errors += 1
                    self._inflight = None
                    for i, s in enumerate(self.slots):
                        if s is not None:
                            self._finish(i, "error", f"{type(e).__name__}: {e}")
        # shutting down: nothing may wait forever
        for i, s in enumerate(self.slots):
            if s is not None:
                self._finish(i, "error", "server shutting down")
        while not self.waiting.empty():
            self.waiting.get_nowait().on_finish("error", "server shutting down")

    @torch.inference_mode()
    def step(self) -> None:
        """Admit + prefill waiting sequences, then one decode step for all running ones (with overlap: queue
        it, then emit the tokens of the step queued before)."""
        with self._timed("step_s"):
            self._step()

    def _step(self) -> None:
        for i, s in enumerate(self.slots):
            if s is not None and s.cancelled:
                self._finish(i, "cancelled")
        admitted = []
        while len(admitted) < self.slots.count(None) and not self.waiting.empty():
            seq = self.waiting.get_nowait()
            if seq.cancelled:
                seq.on_finish("cancelled", None)
                continue
            if seq.sampling.max_new_tokens == 0:
                seq.on_finish("length", None)
                continue
            admitted.append(seq)
        # Short prompts ride along only beside running rows: into an idle engine, one prefill pass (for all
        # the prompts admitted together) keeps no one waiting and costs less than a step per prompt token.
        ride_up_to = self.prefill_in_decode if self.running else 0
        riding = [s for s in admitted if len(s.prompt_ids) <= ride_up_to]
        prefilled = [s for s in admitted if len(s.prompt_ids) > ride_up_to]
        for seq in riding:
            self._assign_slot(seq)
            seq.prompt_fed, seq.next_token, seq.pos = 0, seq.prompt_ids[0], 0
            self.stats.prompts_in_decode += 1
            self.stats.prompt_tokens += len(seq.prompt_ids)
        if prefilled:
            self._prefill(prefilled)
        pending, self._inflight = self._inflight, None
        # With a step in flight, rows whose token from it is their last (length or context) sit the next one out.
        awaiting = {id(s) for s in pending.seqs} if pending is not None else set()
        running = [i for i, s in enumerate(self.slots) if s is not None and not (
            id(s) in awaiting and (s.generated + 1 >= s.sampling.max_new_tokens or s.pos + 1 >= self.max_seq_len))]
        queued = self._decode(running, pending) if running else None
        if pending is not None:
            self._emit(pending)
        if queued is not None:
            if self.overlap:
                self._inflight = queued
            else:
                self._emit(queued)

    def _assign_slot(self, seq: Sequence) -> None:
        slot = self.slots.index(None)  # lowest free slot: running rows stay packed at the front
        self.slots[slot] = seq
        seq.slot = slot
        if seq.sampling.seed is not None:
            seq.uniforms = SeededUniforms(seq.sampling.seed)
        if seq.sampling.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.max_batch_size, self.model.config.vocab_size, dtype=torch.bool,
                                        device=self.device)
            self.seen[slot] = False
            self.seen[slot, self._tensor(seq.prompt_ids)] = True

    def _tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        # Every host-built input of a step goes through here: on CUDA it does not wait for the queued steps.
        return host_to_device(values, dtype, self.device)

    @contextlib.contextmanager
    def _timed(self, stat: str):
        """Adds the seconds spent in the block to EngineStats.<stat>, also when it raises."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.stats, stat, getattr(self.stats, stat) + time.perf_counter() - t0)

    def _prefill(self, seqs: list[Sequence]) -> None:
        with self._timed("prefill_s"):
            self._prefill_pass(seqs)

    def _prefill_pass(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._assign_slot(seq)
        lengths = [len(s.prompt_ids) for s in seqs]
        T = max(lengths)
        rows = len(seqs)
        if self.pad_prefills:  # a few shapes, so the compiled prefill's CUDA graphs are replayed, not re-captured
            T = min(self.max_seq_len, 1 << max(4, (T - 1).bit_length()) if T <= 256 else -(-T // 256) * 256)
            rows = self._prefill_rows(rows)
        # Right padding: pad tokens sit after each prompt, are never attended to, and are overwritten by decoding.
        # Padding rows repeat the last row (its tokens, slot and column): they write what it writes, where it does.
        pad = rows - len(seqs)
        ids = self._tensor([s.prompt_ids + [0] * (T - n) for s, n in zip(seqs, lengths)] + [seqs[-1].prompt_ids
                           + [0] * (T - lengths[-1])] * pad)
        slots = self._tensor([s.slot for s in seqs] + [seqs[-1].slot] * pad)
        last = self._tensor([n - 1 for n in lengths] + [lengths[-1] - 1] * pad)
        self._check_cache()
        logits = self.decoder.prefill(ids, slots=slots, logits_at=last)[: len(seqs)].float()
        self.stats.prefills += 1
        self.stats.prefill_rows += len(seqs)
        self.stats.prompt_tokens += sum(lengths)
        for r, s in enumerate(seqs):
            s.pos = lengths[r]
        step = _StepTokens(seqs, list(lengths), self._sample(seqs, logits))
        self._emit(step, step.tokens())

    def _prefill_rows(self, n: int) -> int:
        """The rows of a padded prefill pass of n prompts: the next power of two, at most max_batch_size."""
        return min(1 << (n - 1).bit_length(), self.max_batch_size)

    def _decode(self, running: list[int], pending: Optional[_StepTokens]) -> Optional[_StepTokens]:
        """Queue one step for the cache's first B rows (B: the bucket holding the highest running slot) and
        its sampling; returns the sampled tokens, still on the device (None if no row sampled). Rows sampled
        in `pending` (the step before, not read yet) take their token from it on the device."""
        seqs = [self.slots[i] for i in running]
        B = next(b for b in self.decode_buckets if b > running[-1])
        ids, pos = [0] * B, [0] * B  # idle rows: token 0 at position 0 of their own unused cache row
        for i, s in zip(running, seqs):
            ids[i], pos[i] = s.next_token, s.pos
        # Rows whose logits give a new token: all but riding prompts before their last token (known before the
        # step runs, so their indices travel with its inputs).
        sampled = [i for i, s in zip(running, seqs) if s.prompt_fed < 0 or s.prompt_fed + 1 == len(s.prompt_ids)]
        on_device = []  # (row of pending, slot): rows whose token is the previous step's, still on the device
        if pending is not None:
            in_step = set(running)
            on_device = [(r, s.slot) for r, s in enumerate(pending.seqs)
                         if s.slot in in_step and self.slots[s.slot] is s]
        # One host-to-device copy for all of the step's indices: ids, positions, the rows and slots of the
        # tokens taken from the previous step, the sampled rows (each copy is a launch and a pinned buffer).
        pending_rows = [r for r, _ in on_device]
        all_pending = pending is not None and pending_rows == list(range(len(pending.seqs)))  # picked as it is
        all_sampled = sampled == list(range(B))  # the logits as they are, no gather
        packed = self._tensor(ids + pos + ([] if all_pending else pending_rows) + [s for _, s in on_device]
                              + ([] if all_sampled else sampled))
        ids_in, pos_in, rest = packed[:B].view(B, 1), packed[B:2 * B].view(B, 1), packed[2 * B:]
        if on_device:
            k = len(on_device)
            if all_pending:
                ids_in[rest[:k], 0] = pending.picked
                rest = rest[k:]
            else:
                ids_in[rest[k:2 * k], 0] = pending.picked[rest[:k]]
                rest = rest[2 * k:]
        self._check_cache()
        logits = self.decoder.step(ids_in, pos_in, pos=pos[0] if B == 1 else None)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(seqs)
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, len(seqs))
        for s in seqs:
            s.pos += 1
            if s.prompt_fed >= 0:  # riding along: the logits are the prompt's until its last token is in
                s.prompt_fed += 1
                if s.prompt_fed < len(s.prompt_ids):
                    s.next_token = s.prompt_ids[s.prompt_fed]
                else:
                    s.prompt_fed = -1
        if not sampled:
            return None
        seqs = [self.slots[i] for i in sampled]
        # The logits are consumed (sampled) on the stream before any later step can overwrite them.
        logits = logits if all_sampled else logits[rest]
        queued = _StepTokens(seqs, [s.pos for s in seqs], self._sample(seqs, logits.float()))
        if self._host_tokens is not None:
            queued.host = self._host_tokens[self._host_turn][: len(seqs)]
            self._host_turn ^= 1
            queued.host.copy_(queued.picked, non_blocking=True)
            queued.ready = torch.cuda.Event()
            queued.ready.record(torch.cuda.current_stream(self.device))  # the model's GPU, not the thread's default
        return queued

    def _check_cache(self) -> None:
        if self.model.causal_mask is not self._cache_mask:
            raise RuntimeError("the model's KV cache was replaced or freed while the serve engine owns it "
                               "(generate or setup_cache on the same model): use another copy of the model")

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        # Rows with the same sampling filters are one batched call whatever their seeds (each seeded row's
        # uniform comes from its own host stream, so its draws do not depend on its neighbours'; its logits may,
        # by rounding, as any batched forward's), and all the picks come back to the host in one copy: a fixed
        # handful of kernels per step, not a handful per row.
        groups: dict = {}
        for r, s in enumerate(seqs):
            c = s.sampling
            key = (c.temperature, c.repetition_penalty) if c.temperature == 0 else \
                (c.temperature, c.top_k, c.top_p, c.min_p, c.repetition_penalty)
            groups.setdefault(key, []).append(r)
        picked = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            first = seqs[rows[0]].sampling
            index = self._tensor(rows) if len(rows) < len(seqs) else None
            part = logits if index is None else logits[index]
            slots = self._tensor([seqs[r].slot for r in rows]) if first.repetition_penalty != 1.0 else None
            streams = [seqs[r].uniforms for r in rows]
            uniforms = None  # unseeded rows alone: drawn on the device
            if first.temperature > 0 and any(u is not None for u in streams):
                uniforms = self._tensor([(u or self._unseeded).take()[0] for u in streams], torch.float64)
            out = sample_next(part, first, seen=None if slots is None else self.seen[slots], uniforms=uniforms)
            if slots is not None:
                self.seen[slots, out] = True
            if index is None:
                picked = out
            else:
                picked[index] = out
        return picked

    def _emit(self, step: _StepTokens, tokens: Optional[list[int]] = None) -> None:
        """Hand each sampled token to its sequence (`tokens`: the step's, already on the host; else they are
        waited for here); finish those that stop or reach their length."""
        if tokens is None:
            with self._timed("wait_s"):
                tokens = step.tokens()
        for s, tok, pos_after in zip(step.seqs, tokens, step.pos_after):
            if s.finished:  # cancelled or stopped while this step was in flight
                continue
            if s.cancelled:
                self._finish(s.slot, "cancelled")
                continue
            if s.sampling.stop_at_eos and tok == s.eos_id:
                self._finish(s.slot, "stop")
                continue
            s.generated += 1
            self.stats.generated_tokens += 1
            try:
                s.on_token(tok)
            except Exception:  # the consumer is gone; drop the sequence
                log.exception("on_token failed")
                self._finish(s.slot, "cancelled")
                continue
            s.next_token = tok
            # tok will sit at position pos_after; one more needs pos_after + 1 inside the context
            if s.generated >= s.sampling.max_new_tokens or pos_after + 1 >= self.max_seq_len:
                self._finish(s.slot, "length")

    def _finish(self, slot: int, reason: str, error: Optional[str] = None) -> None:
        seq = self.slots[slot]
        if seq is None:
            return
        self.slots[slot] = None
        seq.finished = True
        self.stats.finished += 1
        try:
            seq.on_finish(reason, error)
        except Exception:
            log.exception("on_finish failed")


def run_to_completion(engine: Engine, prompts: Seq[Seq[int]], sampling: SamplingConfig) -> list[list[int]]:
    """Submit all prompts at once, step the engine in this thread until all finish; returns the new ids.
    (Tests and benchmarks; the server uses the background thread instead.)"""
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for i, p in enumerate(prompts):
        engine.submit(Sequence(list(p), sampling, on_token=outs[i].append,
                               on_finish=lambda reason, err, i=i: done.__setitem__(i, True)))
    while not all(done):
        engine.step()
    return outs
