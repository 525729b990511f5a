"""Fast autoregressive generation on the static, GQA-aware KV cache.

- `DecodeEngine` owns the model's cache and the one-token decode step; on CUDA the step can be
  compiled with `torch.compile` (static shapes, gpt-fast style) and captured in a CUDA graph that is
  replayed every token, and the prefill compiled too. On CPU everything is eager.
- Batches of prompts of different lengths are left-padded: per-row rotary positions and a key mask hide
  the padding, so each row gets the tokens it would get alone (`generate_batch`, `generate_batch_stream`).
- Sampling (`sample_next`): greedy, temperature, top-k, top-p, min-p, repetition penalty, seed; stop at
  EOS; stop strings at the text level (`TextStreamer`, `stream_text`).

Public API: SamplingConfig, sample_next, draw, SeededUniforms, host_to_device, process_logits, top_p_filter,
DecodeEngine, generate_stream, generate, generate_batch_stream, generate_batch, TextStreamer, stream_text,
generate_text.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional, Sequence

import torch

from tinyllama.checks import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, SEED, check_fields
from tinyllama.errors import TinyLlamaError
from tinyllama.model import Llama


log = logging.getLogger("tinyllama.generate")


class GenerationError(TinyLlamaError, ValueError):
    """Bad generation input (empty prompt, prompt filling the context, bad sampling value)."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None  # drop tokens whose probability is below min_p × the top token's
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL rule)
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings (need a tokenizer)
    seed: Optional[int] = None
    stop_at_eos: bool = True

    def validate(self) -> None:
        check_fields(self, "{}", error=GenerationError, max_new_tokens=NONNEGATIVE_INT, temperature=NONNEGATIVE,
                     top_k=dict(POSITIVE_INT, none_ok=True), top_p=dict(POSITIVE, hi=1, none_ok=True),
                     min_p=dict(PROBABILITY, none_ok=True), repetition_penalty=POSITIVE, seed=dict(SEED, none_ok=True))
        if isinstance(self.stop, str):
            raise GenerationError(f"stop must be a list of strings, got the string {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")

    def replace(self, **changes) -> "SamplingConfig":
        known = {f.name for f in fields(self)}
        bad = set(changes) - known
        if bad:
            raise GenerationError(f"unknown sampling option(s) {sorted(bad)}; known: {sorted(known)}")
        return SamplingConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


# ---- sampling -----------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / transformers rule: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (B, V) -> fp32 logits of the sampling distribution (filtered entries are -inf).

    Order as in transformers: repetition penalty, temperature, top-k, top-p, min-p. Needs temperature > 0.
    """
    logits = logits.float()
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None and cfg.min_p > 0:
        probs = logits.softmax(-1)
        threshold = cfg.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float, candidates: Optional[int] = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always the best one);
    the rest become -inf. A full sort of the vocabulary is slow on a CPU (16 x 32,000: 36 ms, the top 256:
    1.8 ms), so there the top `candidates` (default 256) are looked at first and only rows whose nucleus is
    larger are sorted whole; on a GPU every row is sorted (fast, and no host sync to pick rows)."""
    V = logits.size(-1)
    k = min(V, 256 if candidates is None else candidates)
    if logits.device.type != "cpu" or k >= V:
        return _top_p_sorted(logits, top_p)
    vals, idx = logits.topk(k, dim=-1)  # sorted, best first
    probs = (vals - logits.logsumexp(-1, keepdim=True)).exp()
    cum = probs.cumsum(-1)
    drop = (cum - probs) >= top_p  # the mass before a token already reaches top_p
    drop[..., 0] = False
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, ~drop)
    out = logits.masked_fill(~keep, float("-inf"))
    wide = (cum[..., -1] < top_p).nonzero().flatten().tolist()  # rows whose nucleus goes past the top k
    if wide:
        out[wide] = _top_p_sorted(logits[wide], top_p)
    return out


def _top_p_sorted(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = sorted_logits.softmax(-1)
    # Drop tokens once the mass before them already reaches top_p; always keep the best one.
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: Optional[torch.Generator] = None,
    seen: Optional[torch.Tensor] = None,
    uniforms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). `seen` (B, V) bool marks tokens for the repetition penalty.

    The randomness: `uniforms` (B,), one number in [0, 1) per row (`SeededUniforms`: a seeded row's own
    stream, so its tokens do not depend on the other rows, and a batch of differently seeded rows is still
    one draw: the serve engine's case), else drawn from `generator` (None: torch's default one)."""
    if cfg.temperature == 0:
        if seen is not None and cfg.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
        return logits.argmax(dim=-1)
    return draw(process_logits(logits, cfg, seen), generator, uniforms)


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, without waiting for the device: a plain
    `torch.tensor(values, device="cuda")` copies from pageable memory and synchronizes the stream, so a
    step queued before it would finish first (what an overlapped serve step must not do). On CUDA the copy
    goes from pinned memory, non-blocking (torch's pinned-memory cache keeps the buffer until it is done)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


class SeededUniforms:
    """The random numbers `draw` inverts, from a host RNG per seed (Python's Mersenne Twister): the same seed
    gives the same numbers on every device, a sequence with its own stream (a serve request) samples the
    same alone or beside others, and a step needs no kernel per seeded row, only one small copy
    (`host_to_device`). `generate_batch` takes B numbers per step from the prompt batch's one stream."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.rng = random.Random(seed)  # None: seeded from the OS

    def take(self, n: int = 1) -> list[float]:
        return [self.rng.random() for _ in range(n)]


def draw(logits: torch.Tensor, generator: Optional[torch.Generator] = None,
         uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One sample per row from softmax(logits) (B, V), by inverting the CDF: a uniform u per row, scaled to
    the row's total mass, picks the first token whose cumulative probability exceeds it. One random number
    per row (drawing V per row, as Gumbel-max does, is 13x slower on a CPU), so it can be given: `uniforms`
    (B,) in [0, 1) (`sample_next`); else drawn from `generator`. Filtered tokens (-inf, probability 0)
    have empty intervals and are never picked: a pick of probability 0 (a CUDA scan may add in an order
    that gives an empty interval an ulp) becomes the row's most likely token, and on a GPU the CDF is
    summed in float64 to make that rare (a CPU's float32 cumsum accumulates in double already; its float64
    one is 9x slower)."""
    probs = logits.float().softmax(-1)
    cdf = probs.cumsum(-1) if probs.device.type == "cpu" else probs.double().cumsum(-1)
    if uniforms is None:
        u = torch.empty(logits.size(0), 1, dtype=cdf.dtype, device=logits.device).uniform_(generator=generator)
    elif uniforms.numel() != logits.size(0):
        raise ValueError(f"{uniforms.numel()} uniforms for {logits.size(0)} rows")
    else:
        u = uniforms.to(cdf.dtype).view(-1, 1)
    total = cdf[:, -1:]
    # u * total rounds up to total now and then: keep it below, where some token's interval still holds it.
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=logits.size(-1) - 1)
    return torch.where(probs.gather(1, picked[:, None]).squeeze(1) > 0, picked, probs.argmax(-1))


# ---- the engine ---------------------------------------------------------------------------------
def _decode_step(model: Llama, ids, input_pos, rope_pos, key_mask):
    return model(ids, input_pos=input_pos, rope_pos=rope_pos, key_mask=key_mask)[:, -1]


# A second function (code object) on purpose: it gets its own torch.compile cache, so the prefill's
# default-mode graphs and the decode step's CUDA-graph ones never share entries.
def _prefill_step(model: Llama, ids, input_pos, rope_pos, key_mask, slots=None, logits_at=None):
    # One column's logits a row (the serve engine's rows name theirs; else the last): the head over all T
    # columns would cost T times as much, ~1 ms of a 32 x 128 prefill's 14.7 on an H200.
    if logits_at is None:
        logits_at = torch.full((ids.size(0),), ids.size(1) - 1, dtype=torch.long, device=ids.device)
    # Positions 0..T-1 (DecodeEngine._prefill_positions): without padding, a causal pass over the new keys.
    return model(ids, input_pos=input_pos, rope_pos=rope_pos, key_mask=key_mask, slots=slots, logits_at=logits_at,
                 from_start=key_mask is None)


# The largest batch decode_kernels="auto" runs on the Triton step. H200, one run (perf/results/h200/
# bench_generate_batched.json, 2026-12-02): Triton against the compiled step 1,209 vs 779 tokens/s at batch 1,
# 6,224 vs 5,859 at 8, 12,294 vs 11,172 at 16; 32 was not measured (its gate/up product measured 2.7x
# cuBLAS's time in perf/results/h200/rows_gemm.json).
AUTO_TRITON_MAX_BATCH = 16


class DecodeEngine:
    """Owns `model`'s static KV cache and runs prefill + one-token decode steps.

    compile=True (CUDA only): the decode step is compiled with torch.compile(mode="reduce-overhead",
    fullgraph, static shapes), which captures it in a CUDA graph per (batch size, padded or not) and replays
    it every token. The graphs point into the KV cache, which is kept between calls and re-allocated only
    when a larger or different-batch cache is needed; `release()` frees it. The prefill is compiled too
    (default mode; shapes become dynamic after the first new prompt length; see also prefill_graphs). On
    CPU everything is eager.

    fuse=True first fuses the model's q/k/v and gate/up projections in place (`Llama.fuse_projections`;
    inference only): a decode step is bound by its kernel count, and this removes three matrix products per
    layer (H100: 1.71 -> 1.43 ms per step, perf/NOTES.md).

    decode_kernels: which code runs unpadded decode steps of up to `triton_max_batch` rows. "auto" (default):
    the Triton step (`tinyllama.kernels.decode`, five kernels per layer in one CUDA graph per batch size) when
    compiling on CUDA with a fused model it supports, for batches of up to 16 rows (default triton_max_batch:
    `AUTO_TRITON_MAX_BATCH`), else the compiled step; "triton": the Triton step for every batch up to
    `kernels.decode.MAX_ROWS` (64) by default (an error if it cannot run; on CPU it runs eagerly under
    TRITON_INTERPRET=1, for tests); "torch": never. Larger or padded (rope_pos / key_mask) batches run the
    compiled step.

    triton_deferred: the Triton step's deferred split-K sums at 2+ rows (`TritonDecodeStep(deferred=)`): None
    (default) where its tuning times the whole step faster with them (CUDA), True always, False never.

    prefill_graphs=True (with compile): an unpadded prefill is also captured in a CUDA graph per (batch,
    length) once that shape comes a second time, and replayed for the next prompts of that shape (the
    compiled prefill alone spends ~6-10 ms launching its kernels for 128 tokens on an H100, the graph
    1.8 ms); at most `max_prefill_graphs` are kept.
    """

    max_prefill_graphs = 8

    def __init__(self, model: Llama, compile: bool = False, cache_dtype: Optional[torch.dtype] = None,
                 fuse: bool = False, compile_mode: str = "reduce-overhead", decode_kernels: str = "auto",
                 prefill_graphs: bool = True, triton_max_batch: Optional[int] = None,
                 triton_deferred: Optional[bool] = None) -> None:
        if decode_kernels not in ("auto", "triton", "torch"):
            raise GenerationError(f"decode_kernels must be auto, triton or torch, got {decode_kernels!r}")
        if decode_kernels == "torch" and triton_max_batch:
            raise GenerationError(f"triton_max_batch={triton_max_batch} sizes the Triton decode step, which "
                                  "decode_kernels='torch' never runs: drop one of them")
        if fuse:
            model.fuse_projections()
        self.model = model
        # The embedding table stays a float tensor even when linear layers are quantized (tinyllama.quantize).
        self.device = model.embed_tokens.weight.device
        self.compile = bool(compile) and self.device.type == "cuda"
        self.cache_dtype = cache_dtype or model.embed_tokens.weight.dtype
        self._cache_key: Optional[tuple[int, int]] = None
        self._step, self._prefill = _decode_step, _prefill_step
        if self.compile:
            import torch._dynamo

            # One compiled graph per (batch size, padded or not, model): keep them all, never fall back to eager.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # compile_mode "max-autotune" also benchmarks Triton GEMM templates against cuBLAS (long compile).
            self._step = torch.compile(_decode_step, mode=compile_mode, fullgraph=True, dynamic=False)
            # Eager prefill of 128 tokens took 31 ms on an H100, as long as 20 decode steps: compile it too.
            # The first graph is specialised to its shapes; a new prompt length, batch or cache length
            # recompiles once with that dimension dynamic (torch.compile's automatic dynamic shapes).
            self._prefill = torch.compile(_prefill_step, fullgraph=True)
        self.prefill_graphs = bool(prefill_graphs) and self.compile
        self._prefill_graphs: dict = {}  # (ids shape, cache identity) -> (graph, its inputs, its logits)
        self._prefill_pool = None
        self._prefill_seen: set = set()
        self._uncapturable: set = set()  # prefill shapes whose capture failed once
        self._triton_steps: dict = {}  # batch size -> its TritonDecodeStep, made on first use
        self.triton_max_batch = 0  # 0: no Triton step
        self.triton_deferred = triton_deferred
        self._last_triton = None  # the Triton step the latest prefill/step ran, if any
        if decode_kernels == "triton" or (decode_kernels == "auto" and self.compile):
            from tinyllama.kernels import decode as triton_decode

            reason = triton_decode.unsupported_reason(model)
            if reason is None and (cache_dtype or model.embed_tokens.weight.dtype) != model.embed_tokens.weight.dtype:
                reason = "the Triton decode step keeps the KV cache in the model's dtype"
            if triton_max_batch is None:
                triton_max_batch = triton_decode.MAX_ROWS if decode_kernels == "triton" else AUTO_TRITON_MAX_BATCH
            limit = triton_max_batch
            if not 0 <= limit <= triton_decode.MAX_ROWS:
                raise GenerationError(f"triton_max_batch must lie in 0..{triton_decode.MAX_ROWS}, got {limit}")
            if reason is None:
                self.triton_max_batch = limit
                self.triton_step(1)  # built now: a model it cannot run fails here, not in the first request
            elif decode_kernels == "triton":
                raise GenerationError(f"decode_kernels='triton': {reason}")

    # cache ------------------------------------------------------------------------------------
    def cache_len_for(self, needed: int) -> int:
        if not self.compile:
            return needed
        # Compiled graphs are specialised on the cache length: round up so most calls reuse one graph.
        return min(self.model.config.max_seq_len, -(-needed // 256) * 256)

    def ensure_cache(self, batch_size: int, needed_len: int) -> int:
        max_len = self.cache_len_for(needed_len)
        key = self._cache_key
        if key is None or key[0] != batch_size or key[1] < max_len or not self.model.has_cache:
            self.model.setup_cache(batch_size, max_len, dtype=self.cache_dtype, device=self.device)
            self._cache_key = (batch_size, max_len)
        return self._cache_key[1]

    def release(self) -> None:
        self.model.clear_cache()
        self._cache_key = None
        self._prefill_graphs.clear()  # the graphs point into the freed cache
        self._prefill_seen.clear()
        self._last_triton = None
        for triton_step in self._triton_steps.values():
            triton_step.reset()

    def triton_step(self, batch_size: int):
        """The Triton decode step for `batch_size` rows (made on first use), or None where decode steps of that
        size run the compiled (or eager) PyTorch step."""
        if not 1 <= batch_size <= self.triton_max_batch:
            return None
        found = self._triton_steps.get(batch_size)
        if found is None:
            from tinyllama.kernels.decode import TritonDecodeStep

            deferred = self.triton_deferred if batch_size > 1 else False  # (the rows kernel's, 2+ rows)
            found = self._triton_steps[batch_size] = TritonDecodeStep(self.model, batch_size=batch_size,
                                                                      deferred=deferred)
        return found

    # steps ------------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, rope_pos=None, key_mask=None, *, slots: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ids (B, T) written to positions 0..T-1 -> logits (B, V): of the last column, into cache rows
        0..B-1 (the cache's batch); or, with slots (B,) and logits_at (B,), row b into cache row slots[b] and
        the logits of its column logits_at[b] (the serve engine's admitted prompts, right-padded; no
        rope_pos / key_mask then). With prefill graphs the logits are valid until the next prefill."""
        if slots is not None and (rope_pos is not None or key_mask is not None):
            raise ValueError("slots take no rope_pos / key_mask (right-padded rows need neither)")
        if (slots is None) != (logits_at is None):
            raise ValueError("slots and logits_at go together")
        self._last_triton = None
        if self.prefill_graphs and rope_pos is None and key_mask is None:
            return self._graphed_prefill(ids, slots, logits_at)
        return self._prefill(self.model, ids, self._prefill_positions(ids, slots), rope_pos, key_mask, slots, logits_at)

    def _prefill_positions(self, ids: torch.Tensor, slots: Optional[torch.Tensor]) -> torch.Tensor:
        # 0..T-1: (T,) for the cache's own batch, (B, T) per row for rows going into `slots`
        positions = torch.arange(ids.size(1), device=self.device)
        return positions if slots is None else positions.expand(ids.size(0), -1)

    def _graphed_prefill(self, ids: torch.Tensor, slots: Optional[torch.Tensor] = None,
                         logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        cache = self.model.layers[0].self_attn.kv_cache
        key = (tuple(ids.shape), slots is not None, cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))
        inputs = (ids,) if slots is None else (ids, slots, logits_at)
        entry = self._prefill_graphs.pop(key, None)
        if entry is not None:
            self._prefill_graphs[key] = entry  # most recently used last: eviction takes the oldest use
            graph, static_inputs, _, static_logits = entry
            for static, given in zip(static_inputs, inputs):
                static.copy_(given)
            graph.replay()
            return static_logits
        # A shape seen for the first time only runs (chat turns rarely repeat a length); the second time it
        # runs, then is captured for the next ones. Capturing runs nothing: the cache keeps what the run wrote.
        positions = self._prefill_positions(ids, slots)
        logits = self._prefill(self.model, ids, positions, None, None, slots, logits_at)
        if key not in self._prefill_seen:
            if len(self._prefill_seen) > 1024:
                self._prefill_seen.clear()
            self._prefill_seen.add(key)
            return logits
        if key in self._uncapturable:
            return logits
        static_inputs = tuple(t.clone() for t in inputs)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._prefill_pool):
                static_logits = self._prefill(self.model, static_inputs[0], positions, None, None, *static_inputs[1:])
        except RuntimeError as e:  # this shape cannot be captured here: keep running it compiled, uncaptured
            log.warning("prefill of shape %s not captured in a CUDA graph: %s", tuple(ids.shape), e)
            self._uncapturable.add(key)
            return logits
        self._prefill_pool = graph.pool()
        if len(self._prefill_graphs) >= self.max_prefill_graphs:
            self._prefill_graphs.pop(next(iter(self._prefill_graphs)))  # the oldest
        # Keep every tensor the graph reads alive with it (a freed `positions` would be reused memory).
        self._prefill_graphs[key] = (graph, static_inputs, positions, static_logits)
        return logits

    def step(self, ids: torch.Tensor, input_pos: torch.Tensor, rope_pos=None, key_mask=None,
             pos: Optional[int] = None, last_pos: Optional[int] = None) -> torch.Tensor:
        """ids (B, 1) at cache position input_pos -> logits (B, V). input_pos (1,): the same position in every
        row of the cache's batch; (B, 1): each row its own, in the cache's first B rows (`KVCache`; the serve
        engine's continuous batch). With CUDA graphs the result is overwritten by the next step: consume
        (sample from) it before calling again. `pos`: every row's position as an int, when the caller knows
        it (lets the Triton step skip copying it in); `last_pos`: the last position this generation will reach,
        when known (the Triton step's first tuning then times its attention there too)."""
        triton_step = self.triton_step(ids.size(0)) if rope_pos is None and key_mask is None else None
        self._last_triton = triton_step
        if triton_step is not None:
            return triton_step.step(ids, input_pos, pos=pos, last_pos=last_pos)
        return self._step(self.model, ids, input_pos, rope_pos, key_mask)

    def greedy_token(self) -> Optional[torch.Tensor]:
        """The argmax (B, 1) of the latest step's logits if that step computed it (the Triton step does,
        inside its graph), else None. Passing it back as the next step's ids skips a copy."""
        return self._last_triton.greedy_token() if self._last_triton is not None else None


def _check_prompts(model: Llama, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    ctx = model.config.max_seq_len
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty: pass at least one token (e.g. BOS)")
        if len(p) >= ctx and cfg.max_new_tokens > 0:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens and fills the model's context of {ctx}; shorten it"
            )
        if len(p) > ctx:
            raise GenerationError(f"prompt {i} has {len(p)} tokens, over the model's context of {ctx}")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")


class _StopMatcher:
    """Detects stop strings in a row's generated text."""

    def __init__(self, tokenizer, stops: Sequence[str], prefix: Sequence[int]) -> None:
        self.stops = list(stops)
        self.decoder = tokenizer.stream_decoder(prefix=list(prefix)[-8:])
        self.text = ""

    def put(self, token: int) -> bool:
        piece = self.decoder.put(token)
        if not piece:
            return False
        start = max(0, len(self.text) - max(len(s) for s in self.stops) + 1)
        self.text += piece
        return any(s in self.text[start:] for s in self.stops)


@torch.inference_mode()
def generate_batch_stream(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    eos_id: Optional[int] = None,
    tokenizer=None,
    engine: Optional[DecodeEngine] = None,
) -> Iterator[list[Optional[int]]]:
    """Generate for a batch of prompts of any lengths; yield, per step, a list with each row's new token
    (None once that row has finished). A row finishes at EOS (not yielded), after the token that completes
    a stop string (yielded; needs `tokenizer`), or at max_new_tokens / the context's end."""
    cfg.validate()
    _check_prompts(model, prompts, cfg)
    if cfg.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer: pass tokenizer=...")
    own_engine = engine is None
    engine = engine or DecodeEngine(model)
    device = engine.device
    eos_id = model.config.eos_id if eos_id is None else eos_id
    B = len(prompts)
    lens = [len(p) for p in prompts]
    T = max(lens)
    total = min(T + cfg.max_new_tokens, model.config.max_seq_len)
    n_new = total - T
    if n_new <= 0:
        return
    seeded = SeededUniforms(cfg.seed) if cfg.seed is not None and cfg.temperature > 0 else None

    cache_len = engine.ensure_cache(B, total)
    pads = [T - n for n in lens]
    padded = any(pads)
    ids = torch.tensor([[0] * pad + [int(t) for t in p] for pad, p in zip(pads, prompts)], dtype=torch.long)
    ids = ids.to(device)
    slots = torch.arange(cache_len, device=device)
    rope_all = key_mask = None
    if padded:
        pad_t = torch.tensor(pads, device=device)
        key_mask = slots[None, :] >= pad_t[:, None]  # (B, S): padding slots hidden; future slots hidden by causality
        rope_all = (slots[None, :] - pad_t[:, None]).clamp(min=0)  # (B, S) rotary position of each slot
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for r, p in enumerate(prompts):
            seen[r, torch.tensor([int(t) for t in p], device=device)] = True
    matchers = [_StopMatcher(tokenizer, cfg.stop, p) for p in prompts] if cfg.stop else None

    done = [False] * B
    pipelined = device.type == "cuda"
    host = torch.empty(B, dtype=torch.long, pin_memory=pipelined) if pipelined else None
    # Greedy without a penalty: after a decode step, the engine may hand over the argmax it computed.
    plain_greedy = cfg.temperature == 0 and seen is None

    def decode_step(nxt: torch.Tensor, i: int) -> torch.Tensor:  # token i in, at cache position T + i
        pos = T + i
        return engine.step(nxt.view(B, 1), slots[pos:pos + 1], rope_all[:, pos:pos + 1] if padded else None,
                           key_mask, pos=pos, last_pos=total - 2)

    try:
        logits = engine.prefill(ids, rope_pos=rope_all[:, :T] if padded else None, key_mask=key_mask)
        for i in range(n_new):
            nxt = engine.greedy_token() if plain_greedy else None
            if nxt is None:
                u = host_to_device(seeded.take(B), torch.float64, device) if seeded is not None else None
                nxt = sample_next(logits, cfg, seen=seen, uniforms=u)
            nxt = nxt.view(B)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            last = i + 1 == n_new
            if pipelined:
                # Queue the copy of this token and the next step before waiting: the GPU never idles on Python.
                host.copy_(nxt, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))  # the model's GPU, not the current one
                if not last:
                    logits = decode_step(nxt, i)
                ready.synchronize()
                toks = host.tolist()
            else:
                toks = nxt.tolist()
                if not last:
                    logits = decode_step(nxt, i)
            out: list[Optional[int]] = [None] * B
            for r, tok in enumerate(toks):
                if done[r]:
                    continue
                if cfg.stop_at_eos and tok == eos_id:
                    done[r] = True
                    continue
                out[r] = tok
                if matchers is not None and matchers[r].put(tok):
                    done[r] = True
            if any(t is not None for t in out):
                yield out
            if all(done):
                return
    finally:
        if own_engine:
            engine.release()


def generate_batch(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    cfg: Optional[SamplingConfig] = None,
    *,
    eos_id: Optional[int] = None,
    tokenizer=None,
    engine: Optional[DecodeEngine] = None,
) -> list[list[int]]:
    """New token ids for each prompt (prompts may differ in length)."""
    cfg = cfg or SamplingConfig()
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_batch_stream(model, prompts, cfg, eos_id=eos_id, tokenizer=tokenizer, engine=engine):
        for r, tok in enumerate(step):
            if tok is not None:
                outs[r].append(tok)
    return outs


def generate_stream(
    model: Llama,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    eos_id: Optional[int] = None,
    *,
    tokenizer=None,
    engine: Optional[DecodeEngine] = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (stops at EOS, which is not yielded)."""
    for step in generate_batch_stream(model, [prompt_ids], cfg, eos_id=eos_id, tokenizer=tokenizer, engine=engine):
        yield step[0]


def generate(model: Llama, prompt_ids: Sequence[int], cfg: Optional[SamplingConfig] = None, **kwargs) -> list[int]:
    """Return the new token ids (without the prompt). kwargs override SamplingConfig fields."""
    cfg = cfg or SamplingConfig()
    if kwargs:
        cfg = cfg.replace(**kwargs)
    return list(generate_stream(model, prompt_ids, cfg))


# ---- text level ---------------------------------------------------------------------------------
class TextStreamer:
    """Turns generated ids into text pieces, cutting at the first stop string (which is not emitted).

    Text that could still be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer, prefix: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        self.decoder = tokenizer.stream_decoder(prefix=list(prefix)[-8:])
        self.stop = list(stop)
        self.pending = ""  # decoded but not yet emitted
        self.stopped = False

    def put(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.put(token)
        if not self.stop:
            piece, self.pending = self.pending, ""
            return piece
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            self.stopped = True
            piece, self.pending = self.pending[: min(hits)], ""
            return piece
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        return piece

    def flush(self) -> str:
        piece, self.pending = ("" if self.stopped else self.pending), ""
        return piece


def stream_text(
    model: Llama,
    tokenizer,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    *,
    engine: Optional[DecodeEngine] = None,
) -> Iterator[str]:
    """Yield text pieces of the continuation; stops at EOS or before the first stop string."""
    streamer = TextStreamer(tokenizer, prefix=prompt_ids, stop=cfg.stop)
    for tok in generate_stream(model, prompt_ids, cfg, eos_id=tokenizer.eos_id, tokenizer=tokenizer, engine=engine):
        piece = streamer.put(tok)
        if piece:
            yield piece
        if streamer.stopped:
            return
    tail = streamer.flush()
    if tail:
        yield tail


def generate_text(model: Llama, tokenizer, prompt: str, cfg: Optional[SamplingConfig] = None, **kwargs) -> str:
    """Continue `prompt` (encoded with BOS); the stop string, if hit, is not included."""
    cfg = cfg or SamplingConfig()
    if kwargs:
        cfg = cfg.replace(**kwargs)
    return "".join(stream_text(model, tokenizer, tokenizer.encode(prompt, bos=True), cfg))
