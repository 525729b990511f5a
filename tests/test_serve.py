"""The continuous-batching engine and the OpenAI-compatible server, against a live uvicorn on 127.0.0.1.

The server runs a tiny random-weight model saved with save_pretrained; clients are the official `openai`
package and raw httpx (for bodies the client refuses to send). Greedy outputs are checked token for
token against one-by-one `tinyllama.generate.generate`.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tinyllama.config import ModelConfig
from tinyllama.generate import SamplingConfig, generate, stream_text
from tinyllama.model import Llama
from tinyllama.serve.engine import Engine, Sequence, run_to_completion
from tinyllama.tokenizer import Tokenizer

CFG = ModelConfig.from_name("tinyllama-tiny")  # 256-token context


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(CFG).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(3, CFG.vocab_size, (k,), generator=g).tolist() for k in lengths]


# ---- engine -------------------------------------------------------------------------------------
def test_engine_batched_greedy_equals_one_by_one(model):
    prompts = _prompts(10)
    cfg = SamplingConfig(max_new_tokens=12)
    ref = [generate(model, p, cfg) for p in prompts]
    engine = Engine(model, max_batch_size=4, max_seq_len=128)
    out = run_to_completion(engine, prompts, cfg)
    assert out == ref
    assert engine.stats.max_rows_in_step == 4  # really batched
    assert engine.running == 0 and engine.stats.finished == len(prompts)


def test_mailbox_hands_tokens_over_in_order_and_fails_loudly_on_a_closed_loop():
    """Engine thread -> event loop: every item reaches its queue in order, however many posts share one
    callback; on a closed loop the post raises (the engine then drops the sequence) and keeps nothing."""
    import asyncio

    from tinyllama.serve.app import _Mailbox

    async def run():
        box, queues = _Mailbox(asyncio.get_running_loop()), [asyncio.Queue(), asyncio.Queue()]
        posts = threading.Thread(target=lambda: [box.post(queues[i % 2], i) for i in range(1000)])
        posts.start()
        got = [[await q.get() for _ in range(500)] for q in queues]
        posts.join()
        return got

    even, odd = asyncio.run(run())
    assert even == list(range(0, 1000, 2)) and odd == list(range(1, 1000, 2))
    loop = asyncio.new_event_loop()
    box = _Mailbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        box.post(None, "token")
    assert box.items == []


def test_engine_times_its_steps_and_bench_serve_splits_them(model):
    """EngineStats' step/wait/prefill seconds add up, and `bench serve`'s per-step split of two readings."""
    import time as _time

    from tinyllama.bench.serve import engine_time

    engine = Engine(model, max_batch_size=4, max_seq_len=128)
    before = engine.stats.as_dict()
    t0 = _time.perf_counter()
    run_to_completion(engine, _prompts(6), SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    wall = _time.perf_counter() - t0
    s = engine.stats
    assert 0 < s.prefill_s and 0 <= s.wait_s and s.prefill_s + s.wait_s <= s.step_s <= wall
    t = engine_time(before, engine.stats.as_dict(), wall)
    assert t["decode_steps"] == s.decode_steps > 0 and t["prefills"] == s.prefills > 0
    assert t["host_ms_per_step"] > 0 and t["wall_ms_per_step"] >= t["host_ms_per_step"] + t["wait_ms_per_step"]
    assert 0 < t["prefill_share"] < 1 and 0 <= t["idle_share"] < 0.5


def test_engine_batched_greedy_equals_transformers_dynamic_and_static_cache(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    prompts = _prompts(4, seed=5)
    out = run_to_completion(Engine(model, max_batch_size=4, max_seq_len=128), prompts,
                            SamplingConfig(max_new_tokens=12, stop_at_eos=False))
    for p, mine in zip(prompts, out):
        for cache in (None, "static"):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0, cache_implementation=cache)
            assert mine == ref[0, len(p):].tolist(), cache


def test_engine_requests_join_a_running_batch(model):
    """A request submitted mid-generation is decoded together with the running one and still matches."""
    prompts = _prompts(3, seed=2)
    cfg = SamplingConfig(max_new_tokens=10)
    ref = [generate(model, p, cfg) for p in prompts]
    engine = Engine(model, max_batch_size=4, max_seq_len=128)
    outs = [[] for _ in prompts]
    done = [False] * 3

    def seq(i):
        return Sequence(prompts[i], cfg, outs[i].append, lambda r, e, i=i: done.__setitem__(i, True))

    engine.submit(seq(0))
    for _ in range(4):
        engine.step()
    engine.submit(seq(1))
    engine.step()
    assert engine.running == 2 and engine.stats.max_rows_in_step == 2
    engine.submit(seq(2))
    while not all(done):
        engine.step()
    assert outs == ref
    assert engine.stats.max_rows_in_step == 3


def test_short_prompt_rides_along_in_decode_steps_without_a_prefill_pass(model):
    """A request joining a running one: its 5-token prompt is fed in the next 5 decode steps (the 5th gives
    its first token), the running row gets a token in every one of them, and the model runs once per step:
    no separate prefill pass stalls the running row. Tokens equal `generate`'s. The same prompt into an idle
    engine gets a prefill pass (nobody waits on it)."""
    prompts = [_prompts(1, seed=4)[0], [1, 40, 41, 42, 43]]
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    refs = [generate(model, p, cfg) for p in prompts]
    engine = Engine(model, max_batch_size=2, max_seq_len=128, prefill_in_decode=8)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape), with_kwargs=True)
    try:
        outs = [[], []]
        engine.submit(Sequence(prompts[0], cfg, outs[0].append, lambda r, e: None))
        engine.step()
        engine.step()
        first, calls0 = len(outs[0]), len(calls)
        engine.submit(Sequence(prompts[1], cfg, outs[1].append, lambda r, e: None))
        for k in range(5):
            engine.step()
            assert len(outs[0]) == first + k + 1 and len(outs[1]) == (1 if k == 4 else 0)
        assert len(calls) - calls0 == 5 and all(shape == (2, 1) for shape in calls[calls0:])
        while engine.running:
            engine.step()
    finally:
        hook.remove()
    assert outs == refs
    assert len(prompts[0]) > 8 and engine.stats.prefills == 1  # the first prompt had a prefill pass
    assert engine.stats.prompts_in_decode == 1
    assert run_to_completion(engine, [prompts[1]], cfg) == [refs[1]]  # alone now: a prefill pass
    assert engine.stats.prompts_in_decode == 1 and engine.stats.prefills == 2


def test_overlapped_steps_read_tokens_a_step_late_and_waste_at_most_one_step(model):
    """overlap=True: a step is queued before the previous step's tokens are read, so each step() emits the
    token of the step before. A row at its length sits the next step out (no wasted step); a row that stops
    on EOS ran one step more for nothing; a context-filling row never steps past the cache."""
    prompt = _prompts(1, seed=6)[0][:10]
    cfg = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    ref = generate(model, prompt, cfg)

    def run(overlap, eos=None, max_seq_len=64, sampling=cfg):
        engine = Engine(model, max_batch_size=2, max_seq_len=max_seq_len, overlap=overlap,
                        eos_id=eos)
        got, reasons, per_step = [], [], []
        engine.submit(Sequence(list(prompt), sampling, got.append, lambda r, e: reasons.append(r)))
        while not reasons:
            engine.step()
            per_step.append(len(got))
        return got, reasons[0], engine.stats.decode_steps, per_step

    got, reason, steps, per_step = run(False)
    assert (got, reason, steps) == (ref, "length", 5) and per_step[0] == 2  # prefill's token + the 1st step's
    got, reason, steps, per_step = run(True)
    assert (got, reason, steps) == (ref, "length", 5) and per_step[0] == 1  # the 1st step's token comes later
    eos = ref[3]
    k = ref.index(eos)  # the first time the model says it
    stop = cfg.replace(stop_at_eos=True)
    assert run(False, eos, sampling=stop)[:3] == (ref[:k], "stop", k)
    assert run(True, eos, sampling=stop)[:3] == (ref[:k], "stop", k + 1)  # one wasted step
    long = cfg.replace(max_new_tokens=100)
    filled = run(True, max_seq_len=len(prompt) + 4, sampling=long)
    assert filled[:3] == (run(False, max_seq_len=len(prompt) + 4, sampling=long)[0], "length", 3)


def test_engine_context_limit_and_zero_tokens(model):
    prompt = _prompts(1, seed=3)[0][:20]
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    out = run_to_completion(engine, [prompt], SamplingConfig(max_new_tokens=100, stop_at_eos=False))
    assert len(out[0]) == 32 - len(prompt)  # the whole sequence fills the context, no more
    small = Llama(CFG.replace(max_seq_len=32)).eval()
    small.load_state_dict(model.state_dict())
    assert out[0] == generate(small, prompt, SamplingConfig(max_new_tokens=100, stop_at_eos=False))
    assert run_to_completion(engine, [prompt], SamplingConfig(max_new_tokens=0)) == [[]]
    with pytest.raises(ValueError, match="context"):
        engine.submit(Sequence(list(range(3, 40)), SamplingConfig(), print, print))


def test_engine_cancel_frees_slot_and_seeded_sampling_repeats(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64, prefill_in_decode=0)  # a prefill pass: 1 token
    got, reasons = [], []
    s = engine.submit(Sequence([1, 500, 600], SamplingConfig(max_new_tokens=50), got.append,
                               lambda r, e: reasons.append(r)))
    engine.step()
    engine.step()
    s.cancel()
    engine.step()
    assert reasons == ["cancelled"] and engine.running == 0 and len(got) == 3  # prefill token + 2 decode steps
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    a = run_to_completion(engine, [[1, 42]], cfg)
    b = run_to_completion(engine, [[1, 42], [1, 7, 8]], cfg)
    assert a[0] == b[0]


def _staggered(n_prompts=7, seed=11, prefill_in_decode=0):
    """Requests that join at different steps, with different prompt lengths, max_tokens and sampling (greedy,
    seeded, repetition penalty), so rows finish at different times and leave holes that later rows fill;
    request 3 is cancelled mid-generation (a prompt fed through decode steps first takes a step per token).
    (submit step, prompt, sampling) and {step: request to cancel}."""
    p = _prompts(n_prompts, seed=seed)
    greedy = SamplingConfig
    requests = [
        (0, p[0], greedy(max_new_tokens=12)),
        (0, p[1], SamplingConfig(max_new_tokens=4, temperature=0.9, top_p=0.9, seed=5)),  # leaves first
        (0, p[2], greedy(max_new_tokens=15, repetition_penalty=1.3)),
        (2, p[3], greedy(max_new_tokens=20)),  # cancelled at step 6
        (3, p[4], SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=40, seed=9)),
        (3, p[5], greedy(max_new_tokens=8)),  # waits for a free slot
        (9, p[6], greedy(max_new_tokens=6)),
    ]
    return requests, {6 + (len(p[3]) if len(p[3]) <= prefill_in_decode else 0): 3}


def _run_staggered(engine, requests, cancels):
    """Step the engine in this thread, submitting and cancelling at the scripted steps; (outputs, reasons)."""
    outs = [[] for _ in requests]
    reasons = [None] * len(requests)
    seqs = {}
    for step in range(1000):
        for i, (at, prompt, cfg) in enumerate(requests):
            if at == step:
                seqs[i] = engine.submit(Sequence(list(prompt), cfg, outs[i].append,
                                                 lambda r, e, i=i: reasons.__setitem__(i, r)))
        if step in cancels:
            seqs[cancels[step]].cancel()
        if all(r is not None for r in reasons):
            break
        engine.step()
    return outs, reasons


def _record_decode_batches(engine) -> list:
    """(batch size of the step, running sequences) for every decode step the engine runs."""
    seen, step = [], engine.decoder.step
    engine.decoder.step = lambda ids, *a, **kw: seen.append((ids.size(0), engine.running)) or step(ids, *a, **kw)
    return seen


@pytest.mark.parametrize("buckets, prefill_in_decode, overlap", [
    (None, 0, False), ((2,), 0, False), (None, 16, False), ((2,), 64, False), (None, 0, True), ((2,), 16, True)])
def test_engine_rows_joining_and_leaving_equal_generate(model, buckets, prefill_in_decode, overlap):
    """Token for token equal to one-by-one `generate` (greedy, seeded sampling, repetition penalty) while
    rows join, finish and are cancelled mid-batch; the padded variant pads every decode step to 2 or 4 rows.
    prefill_in_decode: none of the prompts (0), some (16: those of up to 16 tokens) or all (64) are fed
    through decode steps beside the running rows instead of a prefill pass. overlap: each step is queued
    before the previous step's tokens are read."""
    requests, cancels = _staggered(prefill_in_decode=prefill_in_decode)
    refs = [generate(model, p, cfg) for _, p, cfg in requests]
    engine = Engine(model, max_batch_size=4, max_seq_len=128, decode_buckets=buckets,
                    prefill_in_decode=prefill_in_decode, overlap=overlap)
    batches = _record_decode_batches(engine)
    outs, reasons = _run_staggered(engine, requests, cancels)
    assert reasons[3] == "cancelled" and 0 < len(outs[3]) < len(refs[3]) and outs[3] == refs[3][: len(outs[3])]
    for i in set(range(len(requests))) - {3}:
        assert outs[i] == refs[i], i
        assert reasons[i] == ("length" if len(refs[i]) == requests[i][2].max_new_tokens else "stop"), i
    assert engine.stats.max_rows_in_step == 4 and engine.running == 0
    # some steps ran idle padding rows (holes or buckets; overlapped, slots free a step later: no holes here;
    # in the mixed unpadded case each freed slot is refilled in the next step: no hole either)
    assert any(b > rows for b, rows in batches) or (not buckets and (overlap or prefill_in_decode == 16))
    if buckets:
        assert {b for b, _ in batches} <= {2, 4}
    # the three prompts of step 0 find an idle engine: one prefill pass; later short ones ride along
    rode = sum(len(p) <= prefill_in_decode for at, p, _ in requests if at > 0)
    assert engine.stats.prompts_in_decode == rode and engine.stats.prefill_rows == len(requests) - rode
    assert 0 < rode < len(requests) - 3 if prefill_in_decode == 16 else True  # the mixed case is mixed
    assert rode == len(requests) - 3 if prefill_in_decode == 64 else True


def test_engine_padded_prefill_passes_equal_generate(model):
    """Prefill passes padded to the length and row buckets (what a compiled engine does, for its CUDA graphs):
    the pad tokens after each prompt and the padding rows (copies of the last row) change no output, with rows
    joining and leaving as in the staggered run."""
    requests, cancels = _staggered()
    refs = [generate(model, p, cfg) for _, p, cfg in requests]
    engine = Engine(model, max_batch_size=4, max_seq_len=128)
    engine.pad_prefills = True
    passes = []  # (rows, padded length, longest prompt of the pass)
    prefill = engine.decoder.prefill
    engine.decoder.prefill = lambda ids, **kw: passes.append((*ids.shape, int(kw["logits_at"].max()) + 1)) \
        or prefill(ids, **kw)
    outs, reasons = _run_staggered(engine, requests, cancels)
    assert all(outs[i] == refs[i] for i in set(range(len(requests))) - {3}) and reasons[3] == "cancelled"
    assert passes and all(n in {16, 32, 64, 128} and n >= longest for _, n, longest in passes)
    assert any(n > longest for _, n, longest in passes)  # padding happened
    assert {rows for rows, _, _ in passes} <= {1, 2, 4} and passes[0][0] == 4  # step 0's three prompts: 4 rows


def test_engine_sampling_ops_per_step_do_not_grow_per_seeded_row(model):
    """The sampler is batched: rows with the same filters are one call whatever their seeds (their uniforms
    come from host streams in one copy), and one copy brings every row's token to the host. Counted in aten
    ops outside the model (on a GPU each is a kernel launch); the per-row sampler it replaced took ~8 per
    seeded row (~18 with top-p) and one host sync per row, the per-row device generators after it 2."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops_per_step(rows: int) -> float:
        engine = Engine(model, max_batch_size=8, max_seq_len=64)
        inner = engine.decoder.step

        def model_step(*a, **kw):  # the model's own ops are not the sampler's
            with _disable_current_modes():
                return inner(*a, **kw)

        engine.decoder.step = model_step
        done = []
        for i in range(rows):
            cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=i,
                                 stop_at_eos=False)
            engine.submit(Sequence(list(range(3, 10 + i)), cfg, lambda t: None, lambda r, e: done.append(r)))
        engine.step()  # admission and prefill
        steps0, Count.n = engine.stats.decode_steps, 0
        with Count():
            while len(done) < rows:
                engine.step()
        return Count.n / (engine.stats.decode_steps - steps0)

    two, eight = ops_per_step(2), ops_per_step(8)
    assert eight - two <= 1, (two, eight)  # no op per seeded row


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_step_builds_its_inputs_in_one_host_tensor(model, temperature):
    """A decode step's host-built indices (ids, positions, the previous step's rows and slots, the sampled
    rows) reach the device as one tensor, and seeded draws as one more: on a GPU each is a pinned buffer and a
    copy. Counted as tensors made from host data (aten.lift_fresh), overlapped, with a padding row (7 rows in
    the 8-row bucket) and a prompt riding along."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    class Count(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.made += func is torch.ops.aten.lift_fresh.default
            return func(*args, **(kwargs or {}))

    engine = Engine(model, max_batch_size=8, max_seq_len=64, decode_buckets=[8], prefill_in_decode=8, overlap=True)
    inner = engine.decoder.step

    def model_step(*a, **kw):
        with _disable_current_modes():
            return inner(*a, **kw)

    engine.decoder.step = model_step
    done = []
    cfg = lambda i: SamplingConfig(max_new_tokens=10, temperature=temperature, seed=i, stop_at_eos=False)  # noqa: E731
    for i in range(6):
        engine.submit(Sequence(list(range(3, 12 + i)), cfg(i), lambda t: None, lambda r, e: done.append(r)))
    engine.step()  # one prefill pass, the first step
    engine.submit(Sequence([5, 6, 7], cfg(9), lambda t: None, lambda r, e: done.append(r)))  # rides along
    steps0, Count.made = engine.stats.decode_steps, 0
    with Count():
        for _ in range(3):
            engine.step()
    assert engine.stats.decode_steps - steps0 == 3 and engine.stats.prompts_in_decode == 1
    assert Count.made == 3 * (1 if temperature == 0 else 2), Count.made


def test_engine_runs_the_model_only_through_llama_forward(model):
    """No per-layer code in the engine: every submodule of the model runs inside a `Llama.forward` call."""
    import inspect

    import tinyllama.serve.engine as engine_module

    depth, outside, calls = [], [], []

    def enter(module, args):
        depth.append(1)
        calls.append(1)

    def leave(module, args, out):
        depth.pop()

    def check(module, args, name):
        if not depth:
            outside.append(name)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    for name, sub in model.named_modules():
        if sub is not model:
            handles.append(sub.register_forward_pre_hook(lambda m, a, name=name: check(m, a, name)))
    try:
        engine = Engine(model, max_batch_size=3, max_seq_len=64)
        run_to_completion(engine, _prompts(4, seed=9), SamplingConfig(max_new_tokens=5, stop_at_eos=False))
    finally:
        for h in handles:
            h.remove()
    assert not outside, sorted(set(outside))
    assert len(calls) == engine.stats.prefills + engine.stats.decode_steps
    source = inspect.getsource(engine_module)
    assert ".layers" not in source and "self_attn" not in source and "kv_cache" not in source


def _assert_same_tokens(got, want, cancelled, overlap):
    """((staggered outputs, reasons), alone) equal; with overlap, a request cancelled between two steps has one
    token fewer: the token of the step in flight when the cancel is seen is not emitted yet, and is dropped
    (without overlap it was emitted in that step)."""
    (outs, reasons), alone = got
    (want_outs, want_reasons), want_alone = want
    assert reasons == want_reasons and alone == want_alone
    for i, (o, w) in enumerate(zip(outs, want_outs)):
        assert o == (w[:-1] if overlap and i in cancelled else w), i


@pytest.mark.parametrize("fuse", [False, True])
def test_overlapped_bucketed_engine_equals_serial(model, fuse):
    """The CUDA test below, eager on the CPU (fuse: the fused q/k/v and gate/up projections): buckets 1/2/4/8,
    short prompts riding in decode steps and overlapped steps give the serial engine's tokens, a cancel aside."""
    requests, cancels = _staggered(prefill_in_decode=32)
    alone = [requests[0][1]], SamplingConfig(max_new_tokens=8)
    serial = Engine(model, max_batch_size=8, max_seq_len=128, prefill_in_decode=32)
    want = _run_staggered(serial, requests, cancels), run_to_completion(serial, *alone)
    engine = Engine(copy.deepcopy(model), max_batch_size=8, max_seq_len=128, fuse=fuse,
                    decode_buckets=[1, 2, 4, 8], prefill_in_decode=32, overlap=True)
    _assert_same_tokens((_run_staggered(engine, requests, cancels), run_to_completion(engine, *alone)), want,
                        cancelled=cancels.values(), overlap=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fuse, overlap", [(False, False), (True, False), (True, None)])  # None: the default (on)
def test_compiled_bucketed_engine_equals_eager_cuda(model, fuse, overlap):
    """compile=True: decode steps padded to power-of-two buckets, each one CUDA graph (fuse: the buckets run
    the Triton steps), give the eager engine's tokens (fp32, sharpened logits: no near-ties).
    Both engines feed the short prompts through decode steps (compiled: the default), the longer ones get
    prefill passes. overlap: the compiled engine queues each step before reading the previous step's tokens
    (pinned copies and events), the eager one does not (the cancelled request then has one token fewer)."""
    eager_model = copy.deepcopy(model).cuda()
    with torch.no_grad():
        eager_model.lm_head.weight.mul_(6.0)
    compiled_model = copy.deepcopy(eager_model)
    requests, cancels = _staggered(prefill_in_decode=32)
    alone = [requests[0][1]], SamplingConfig(max_new_tokens=8)  # slot 0 alone: the batch-1 bucket
    eager = Engine(eager_model, max_batch_size=8, max_seq_len=128, prefill_in_decode=32)
    want = _run_staggered(eager, requests, cancels), run_to_completion(eager, *alone)
    engine = Engine(compiled_model, max_batch_size=8, max_seq_len=128, compile=True, fuse=fuse, overlap=overlap)
    assert engine.compile and engine.decode_buckets == [1, 2, 4, 8] and engine.prefill_in_decode == 32  # default
    assert engine.overlap is (overlap is None)  # compiled: overlapped by default
    assert engine.warmup() > 0  # every bucket compiled up front; its scratch writes must not change outputs
    batches = _record_decode_batches(engine)
    _assert_same_tokens((_run_staggered(engine, requests, cancels), run_to_completion(engine, *alone)), want,
                        cancelled=cancels.values(), overlap=engine.overlap)
    sizes = {b for b, _ in batches}
    assert sizes <= {1, 2, 4, 8} and 1 in sizes and len(sizes) > 2 and any(b > rows for b, rows in batches)
    assert (engine.decoder.triton_step(1) is not None) == fuse  # fused: batch 1 ran the Triton step


def test_serve_compile_flag_reaches_the_engine():
    pytest.importorskip("fastapi")
    import argparse

    from tinyllama.cli.serve import add_arguments, config_from_args
    from tinyllama.serve.server import build

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--random-preset", "tinyllama-tiny"])).compile is False
    cfg = config_from_args(parser.parse_args(["--random-preset", "tinyllama-tiny", "--device", "cpu", "--compile"]))
    _, engine = build(cfg)
    assert cfg.compile and engine.model.projections_fused and not engine.compile  # CPU: fused, eager
    assert engine.prefill_in_decode == 0  # CPU: every prompt gets a prefill pass unless asked
    assert engine.overlap is False  # CPU: no device to overlap with; compiled on CUDA it is on by default
    assert build(config_from_args(parser.parse_args(["--random-preset", "tinyllama-tiny", "--device", "cpu",
                                                     "--overlap"])))[1].overlap is True
    assert config_from_args(parser.parse_args(["--random-preset", "tinyllama-tiny", "--no-overlap"])).overlap is False
    cfg = config_from_args(parser.parse_args(["--random-preset", "tinyllama-tiny", "--device", "cpu",
                                              "--prefill-in-decode", "8"]))
    assert build(cfg)[1].prefill_in_decode == 8


# ---- live server --------------------------------------------------------------------------------
class LiveServer:
    def __init__(self, app, engine):
        import uvicorn

        self.engine = engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        self.engine.start()
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()
        self.sock.close()


@pytest.fixture(scope="module", params=["default", "overlap+prefill-in-decode"])
def server(request, model, tok, tmp_path_factory):
    """A live server on the saved tiny model; every test below runs against the default engine and against
    one that overlaps its steps and feeds prompts of up to 32 tokens through decode steps."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from tinyllama.serve.server import ServeConfig, build

    d = tmp_path_factory.mktemp("served") / "tiny-chat"
    model.save_pretrained(d, tokenizer=tok)
    engine_options = {} if request.param == "default" else {"overlap": True, "prefill_in_decode": 32}
    app, engine = build(ServeConfig(model=str(d), model_name="tiny", max_batch_size=16, device="cpu",
                                    **engine_options))
    assert (engine.overlap, engine.prefill_in_decode) == ((False, 0) if not engine_options else (True, 32))
    with LiveServer(app, engine) as live:
        live.model = model  # references come from the saved model's source: the served one is the engine's
        live.model_dir = d
        live.service = app.state.service
        yield live


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ref_text(model, tok, prompt_ids, n, stop=()):
    return "".join(stream_text(model, tok, prompt_ids, SamplingConfig(max_new_tokens=n, stop=tuple(stop))))


def test_health_and_models(server, client):
    import httpx

    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 16
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_plain_and_streaming_equal_generate(server, client, tok):
    prompt = "The quick brown fox"
    ids = tok.encode(prompt, bos=True)
    ref_ids = generate(server.model, ids, SamplingConfig(max_new_tokens=12))
    ref = _ref_text(server.model, tok, ids, 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref
    assert r.choices[0].finish_reason == ("length" if len(ref_ids) == 12 else "stop")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref_ids)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref_ids)
    # token-id prompts and echo
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, echo=True)
    assert r2.choices[0].text == tok.decode(ids) + ref


def test_chat_plain_and_streaming_equal_generate(server, client, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ids = tok.encode(tok.apply_chat_template(messages), bos=True)
    ref = _ref_text(server.model, tok, ids, 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_and_n(server, client, tok):
    prompt = "Once upon a time"
    ids = tok.encode(prompt, bos=True)
    full = _ref_text(server.model, tok, ids, 16)
    stop = full.strip()[3:6]
    assert stop, full
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0.9, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0.9, n=3, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_server_stays_up(server, client):
    import httpx
    import openai

    url = server.url + "/v1"
    err = _error(httpx.post(url + "/completions", content=b'{"model": "tiny", "prompt": ',
                            headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    _error(httpx.post(url + "/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=3)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])

    long_prompt = "hello " * 400  # > 256-token context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=3)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_prompt}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=255)  # 2 + 255 tokens > context of 256
    assert e.value.code == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-5)
    assert e.value.param == "max_tokens"
    err = _error(httpx.post(url + "/completions", json={"prompt": "hi"}), 400)
    assert err["param"] == "model"
    err = _error(httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": []}), 400)
    assert err["param"] == "messages"
    err = _error(httpx.post(url + "/completions", json={"model": "tiny", "prompt": [99999999]}), 400)
    assert err["param"] == "prompt"
    _error(httpx.post(url + "/completions", json={"model": "tiny", "prompt": "x", "temperature": 5}), 400)
    err = _error(httpx.post(url + "/completions", json={"model": "tiny", "prompt": "x", "logprobs": 6}), 400)
    assert err["param"] == "logprobs"  # OpenAI's limit is 5
    err = _error(httpx.post(url + "/completions", json={"model": "tiny", "prompt": "x", "logprobs": 1,
                                                          "stream": True}), 400)
    assert err["param"] == "logprobs" and err["code"] == "unsupported_parameter"
    for field, raw in (("repetition_penalty", "Infinity"), ("temperature", "NaN"), ("seed", str(2**64))):
        # Python's JSON reader takes NaN and Infinity; they are refused like any other bad value
        body = f'{{"model": "tiny", "prompt": "x", "{field}": {raw}}}'.encode()
        err = _error(httpx.post(url + "/completions", content=body, headers={"content-type": "application/json"}), 400)
        assert err["param"] == field, err
    _error(httpx.get(server.url + "/v1/nothing-here"), 404)
    _error(httpx.get(url + "/completions"), 405)

    # still up and still correct
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None


def _model_logprobs(model, ids):
    """log p(ids[k] | ids[:k]) for k >= 1 and each position's log-softmax, from one plain forward."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), lp


def _check_logprobs_shape(lp, text, n_top):
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
    for tok, top in zip(lp["tokens"], lp["top_logprobs"]):
        if top is not None:
            assert n_top <= len(top) <= n_top + 1


def test_completion_echo_logprobs_score_the_prompt(server, tok):
    """echo + max_tokens 0: the prompt's log-probabilities (the first null) and top alternatives, batched."""
    import httpx

    texts = ["The quick brown fox jumps", "A café in Zürich — naïve 🦙", "x"]  # 🦙: four byte tokens
    prompts = [tok.encode(t, bos=True) for t in texts]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompts, "echo": True,
                                                         "max_tokens": 0, "logprobs": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for ids, c in zip(prompts, choices):
        assert c["text"] == tok.decode(ids)
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        _check_logprobs_shape(lp, c["text"], 3)
        if len(ids) == 1:
            continue
        ref, full = _model_logprobs(server.model, ids)
        assert lp["token_logprobs"][1:] == pytest.approx(ref, abs=1e-4)
        for k, top in enumerate(lp["top_logprobs"][1:]):
            best = full[k].topk(3).values.tolist()
            assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best, abs=1e-4)
            assert max(top.values()) >= lp["token_logprobs"][k + 1]


def test_completion_logprobs_of_generated_tokens(server, client, tok):
    """Without echo: the completion's tokens, their log-probabilities under the model; greedy picks the top one."""
    ids = tok.encode("Once upon a time", bos=True)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    c = r.choices[0]
    new = generate(server.model, ids, SamplingConfig(max_new_tokens=6))
    assert c.text == _ref_text(server.model, tok, ids, 6)
    lp = c.logprobs
    assert len(lp.tokens) == len(new) == r.usage.completion_tokens
    _check_logprobs_shape(lp.model_dump(), c.text, 2)
    ref, _ = _model_logprobs(server.model, ids + new)
    assert lp.token_logprobs == pytest.approx(ref[len(ids) - 1:], abs=1e-4)
    assert all(chosen == max(top.values()) for chosen, top in zip(lp.token_logprobs, lp.top_logprobs))
    r0 = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=0, echo=True)
    lp0 = r0.choices[0].logprobs
    assert len(lp0.tokens) == len(ids) + 3 and all(t is None or len(t) == 1 for t in lp0.top_logprobs)


def test_lm_eval_local_completions_equals_tinyllama_scorer(server):
    """lm-eval's `local-completions` model (echo, logprobs 1, token-id prompts) against the live server gives
    `tinyllama eval`'s log-likelihoods and greedy flags on the same multiple-choice requests."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tinyllama.eval.scoring import Scorer

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", tokenizer=str(server.model_dir),
                             tokenizer_backend="huggingface", add_bos_token=True, max_length=256, batch_size=3,
                             max_retries=1)
    words = "the cat dog ran over under a tree house river quickly slowly red blue green".split()
    pairs = []
    for i in range(4):
        question = " ".join(words[(i * 5 + k) % len(words)] for k in range(6)) + "?"
        pairs += [(question, " " + " ".join(words[(i + j * 3 + k) % len(words)] for k in range(1 + j)))
                  for j in range(3)]
    pairs.append(("", "the cat"))  # an empty context: conditioned on BOS alone
    scorer = Scorer(server.model, Tokenizer(server.model_dir), batch_size=4)
    for question, _ in pairs[:12:3]:  # continuations that ARE the greedy ones, so the greedy flags are tested
        ids = scorer.encode(question)
        new = generate(server.model, ids, SamplingConfig(max_new_tokens=2, stop_at_eos=False))
        text = scorer.tokenizer.decode(ids + new)
        pairs.append((question, text[len(scorer.tokenizer.decode(ids)):]))
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    mine = scorer.loglikelihood(pairs)
    assert [ll for ll, _ in theirs] == pytest.approx([ll for ll, _ in mine], abs=1e-4)
    assert [g for _, g in theirs] == [g for _, g in mine]
    assert any(g for _, g in mine[13:]) and not any(g for _, g in mine[:12])


def test_body_over_the_size_limit_gets_413_before_it_is_read(server, monkeypatch):
    import httpx

    from tinyllama.serve import app as app_mod
    from tinyllama.serve.server import DEFAULT_MAX_REQUEST_BYTES

    seen = []
    monkeypatch.setattr(app_mod, "_decode_request", lambda *a: seen.append("parsed"))
    for name in ("encode", "encode_batch"):
        monkeypatch.setattr(server.service.tokenizer, name, lambda *a, **k: seen.append("tokenized"))
    body = json.dumps({"model": "tiny", "prompt": "hello " * (DEFAULT_MAX_REQUEST_BYTES // 6)}).encode()
    assert len(body) > DEFAULT_MAX_REQUEST_BYTES
    url = server.url + "/v1/completions"
    headers = {"content-type": "application/json"}
    err = _error(httpx.post(url, content=body, headers=headers, timeout=60), 413)  # with Content-Length
    assert err["code"] == "request_too_large" and f"{DEFAULT_MAX_REQUEST_BYTES:,}" in err["message"]
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # chunked: no Content-Length
    err = _error(httpx.post(url, content=chunks, headers=headers, timeout=60), 413)
    assert err["code"] == "request_too_large"
    assert seen == []
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_health_answers_while_a_large_request_is_tokenized(server, monkeypatch):
    import httpx

    tokenizer = server.service.tokenizer
    started, spans = threading.Event(), []

    def timed(encode):
        def timed_encode(text, *a, **k):
            t0 = time.perf_counter()
            started.set()
            try:
                return encode(text, *a, **k)
            finally:
                spans.append((t0, time.perf_counter()))
        return timed_encode

    for name in ("encode", "encode_batch"):
        monkeypatch.setattr(tokenizer, name, timed(getattr(tokenizer, name)))
    # under the size limit, far over the context: tokenized (about a second here), then refused with 400
    body = {"model": "tiny", "prompt": "hello world " * 80_000, "max_tokens": 1}
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=120)
        assert started.wait(60)
        health = httpx.get(server.url + "/health", timeout=120)
        answered = time.perf_counter()
        assert large.result().json()["error"]["code"] == "context_length_exceeded"
    assert health.status_code == 200
    (t0, t1), = spans
    # /health came back while the large prompt was still being tokenized (on the event loop it waited for it)
    assert answered < t1, (answered - t0, t1 - t0)


def test_concurrent_requests_are_batched_and_equal_one_by_one(server, client, tok):
    prompts = [f"Request number {i} says" for i in range(16)]
    refs = [_ref_text(server.model, tok, tok.encode(p, bos=True), 16) for p in prompts]
    before = server.engine.stats.max_rows_in_step
    server.engine.stats.max_rows_in_step = 0

    def one(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, prompts))
    assert outs == refs
    assert server.engine.stats.max_rows_in_step > 1, "concurrent requests were not decoded together"
    server.engine.stats.max_rows_in_step = max(before, server.engine.stats.max_rows_in_step)


def test_client_disconnect_frees_the_slot(server):
    import httpx

    body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got one token, hang up
    deadline = time.time() + 10
    while server.engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.running == 0


def test_load_200_requests_16_clients(server, client):
    """Bounded load test: zero failures; throughput goes to BENCHMARKS.md (GGUF / serving)."""
    n_requests, n_clients, max_tokens = 200, 16, 16
    server.engine.stats.max_rows_in_step = 0
    steps0, rows0 = server.engine.stats.decode_steps, server.engine.stats.decode_rows

    def one(i):
        if i % 2:
            r = client.completions.create(model="tiny", prompt=f"load {i}", max_tokens=max_tokens, temperature=0.7,
                                          seed=i)
            return r.usage.completion_tokens
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"load {i}"}],
                                           max_tokens=max_tokens, temperature=0.7, seed=i)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        tokens = list(pool.map(one, range(n_requests)))
    dt = time.perf_counter() - t0
    steps = server.engine.stats.decode_steps - steps0
    rows = server.engine.stats.decode_rows - rows0
    print(f"\nload test: {n_requests} requests, {n_clients} clients, {dt:.2f} s, {n_requests / dt:.1f} req/s, "
          f"{sum(tokens) / dt:.0f} completion tok/s, mean {rows / max(steps, 1):.1f} seqs per decode step, "
          f"max {server.engine.stats.max_rows_in_step}")
    assert len(tokens) == n_requests and all(t >= 1 for t in tokens)
    assert server.engine.stats.max_rows_in_step > 1
    assert json.loads(json.dumps(server.engine.stats.as_dict()))["errors"] == 0


def test_engine_runs_a_fused_model():
    import copy

    from tinyllama import Llama, ModelConfig
    from tinyllama.generate import SamplingConfig, generate_batch
    from tinyllama.serve.engine import Engine, run_to_completion

    cfg = ModelConfig(name="serve-fused", vocab_size=256, n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2,
                      intermediate_size=128, max_seq_len=64)
    torch.manual_seed(3)
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    prompts = [[1, 5, 9, 20], [1, 7]]
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    expect = generate_batch(model, prompts, sampling)
    fused = copy.deepcopy(model).fuse_projections()
    # run_to_completion steps the engine in this thread (no background thread)
    assert run_to_completion(Engine(fused, max_batch_size=4), prompts, sampling) == expect
    assert run_to_completion(Engine(model, max_batch_size=4), prompts, sampling) == expect
