"""Generation: parity with transformers (dynamic and static cache), batching, sampling filters, stop strings."""

import copy

import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.generate import (
    DecodeEngine,
    GenerationError,
    SamplingConfig,
    TextStreamer,
    generate,
    generate_batch,
    generate_batch_stream,
    generate_stream,
    generate_text,
    process_logits,
    sample_next,
)




transformers = pytest.importorskip("transformers")

SMALL = ModelConfig(name="gen-test", vocab_size=512, n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2,
                    intermediate_size=160, max_seq_len=128)


def _sharpen(model: Llama, factor: float = 6.0) -> Llama:
    # Random models have near-flat logits, where argmax ties make greedy comparisons fragile: sharpen them.
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(11)
    ours = _sharpen(Llama(SMALL).eval())
    d = tmp_path_factory.mktemp("gen") / "m"
    ours.save_pretrained(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    return ours, hf


PROMPTS = [[1, 5, 9, 200, 17, 33, 4], [1, 300], [1, 42, 7, 7, 7, 7, 7, 7, 7, 7, 7, 99]]


def _hf_greedy(hf, prompt, n, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("static", [False, True])
def test_greedy_equals_transformers(pair, static):
    ours, hf = pair
    kw = {"cache_implementation": "static"} if static else {}
    for prompt in PROMPTS:
        mine = generate(ours, prompt, max_new_tokens=30, stop_at_eos=False)
        assert mine == _hf_greedy(hf, prompt, 30, **kw)


def test_repetition_penalty_greedy_equals_transformers(pair):
    ours, hf = pair
    for prompt in PROMPTS[:2]:
        mine = generate(ours, prompt, max_new_tokens=25, stop_at_eos=False, repetition_penalty=1.5)
        assert mine == _hf_greedy(hf, prompt, 25, repetition_penalty=1.5)


def test_batched_equals_one_by_one_and_transformers_batch(pair):
    ours, hf = pair
    singles = [generate(ours, p, max_new_tokens=20, stop_at_eos=False) for p in PROMPTS]
    batched = generate_batch(ours, PROMPTS, SamplingConfig(max_new_tokens=20, stop_at_eos=False))
    assert batched == singles
    # transformers with left padding agrees too
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert out[:, T:].tolist() == singles


def test_fused_engine_equals_unfused_and_transformers(pair):
    import copy

    ours, hf = pair
    fused = copy.deepcopy(ours)
    engine = DecodeEngine(fused, fuse=True)  # fuses q/k/v and gate/up in place (inference only)
    assert fused.projections_fused and not ours.projections_fused
    cfg = SamplingConfig(max_new_tokens=20, stop_at_eos=False)
    assert generate_batch(fused, PROMPTS, cfg, engine=engine) == generate_batch(ours, PROMPTS, cfg)
    assert generate_batch(fused, PROMPTS[:1], cfg, engine=engine)[0] == _hf_greedy(hf, PROMPTS[0], 20)


def test_prefill_runs_the_head_on_the_last_column_only_and_attends_from_start(pair, monkeypatch):
    # The head over every prompt column cost ~1 ms of a 32 x 128 prefill on an H200 for logits never read.
    # And the prompt attends over its own keys (from_start): the cache is written, never read back (update).
    from tinyllama.model import KVCache

    def update(*args):
        raise AssertionError("the prefill read the cache back: from_start was not passed")

    monkeypatch.setattr(KVCache, "update", update)
    ours, _ = pair
    model = copy.deepcopy(ours)
    engine = DecodeEngine(model)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    heads = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: heads.append(tuple(args[0].shape)))
    try:
        engine.ensure_cache(2, 32)
        with torch.inference_mode():
            logits = engine.prefill(ids)
    finally:
        hook.remove()
    assert heads == [(2, SMALL.hidden_size)]
    with torch.no_grad():
        torch.testing.assert_close(logits, ours(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_batch_rows_stop_independently_and_engine_reuse(pair):
    ours, _ = pair
    free = [generate(ours, p, max_new_tokens=12, stop_at_eos=False) for p in PROMPTS]
    eos = free[0][4]  # row 0 stops at its 5th token; other rows stop wherever that id first appears
    expect = [f[: f.index(eos)] if eos in f else f for f in free]
    engine = DecodeEngine(ours)
    cfg = SamplingConfig(max_new_tokens=12)
    for _ in range(2):  # the cache is kept and reused between calls
        assert generate_batch(ours, PROMPTS, cfg, eos_id=eos, engine=engine) == expect
    assert ours.has_cache
    engine.release()
    assert not ours.has_cache
    steps = list(generate_batch_stream(ours, PROMPTS, cfg, eos_id=eos))
    assert all(any(t is not None for t in s) for s in steps)
    assert [t[0] for t in steps if t[0] is not None] == expect[0]


def test_streaming_equals_non_streaming(pair):
    ours, _ = pair
    cfg = SamplingConfig(max_new_tokens=15, temperature=0.8, top_k=20, seed=3, stop_at_eos=False)
    assert list(generate_stream(ours, PROMPTS[0], cfg)) == generate(ours, PROMPTS[0], cfg)


def test_seeded_sampling_is_reproducible_and_batch_rows_differ(pair):
    ours, _ = pair
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, min_p=0.01, seed=5, stop_at_eos=False)
    a = generate_batch(ours, [PROMPTS[1]] * 3, cfg)
    b = generate_batch(ours, [PROMPTS[1]] * 3, cfg)
    assert a == b
    assert len({tuple(r) for r in a}) > 1  # each row draws its own sample
    assert generate(ours, PROMPTS[1], cfg.replace(seed=6)) != a[0]


def test_logit_processing_matches_transformers_processors():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    history = torch.randint(0, 300, (4, 30))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, history, True)
    for kw in [dict(temperature=0.7, top_k=40), dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.1),
               dict(temperature=0.9, top_k=100, top_p=0.9, min_p=0.05, repetition_penalty=1.3)]:
        cfg = SamplingConfig(**kw)
        procs = LogitsProcessorList()
        if cfg.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
        procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p:
            procs.append(TopPLogitsWarper(cfg.top_p))
        if cfg.min_p:
            procs.append(MinPLogitsWarper(cfg.min_p))
        theirs = procs(history, logits.clone())
        mine = process_logits(logits, cfg, seen)
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs)), kw
        fin = torch.isfinite(mine)
        torch.testing.assert_close(mine[fin], theirs[fin])


def test_sampling_respects_filters():
    logits = torch.tensor([[5.0, 4.9, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    minp = sample_next(logits, SamplingConfig(temperature=1.0, min_p=0.5), g)
    assert set(minp.tolist()) == {0, 1}
    assert sample_next(logits[:1], SamplingConfig()).item() == 0


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_on_cpu_looks_at_the_top_candidates_first_and_keeps_what_a_full_sort_keeps(top_p):
    from tinyllama.generate import _top_p_sorted, top_p_filter

    torch.manual_seed(0)
    # sharp rows (nucleus inside the top 8), flat rows (far wider: sorted whole) and rows in between
    sharpness = torch.tensor([8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.1, 0.0])
    logits = torch.randn(12, 2000) * sharpness[:, None]
    want = _top_p_sorted(logits, top_p)
    got = top_p_filter(logits, top_p, candidates=8)
    assert torch.equal(got, want)  # the same tokens kept (-inf elsewhere), the same logits
    wide = (logits.topk(8).values - logits.logsumexp(-1, keepdim=True)).exp().sum(-1) < top_p
    assert wide.any() and not wide.all()  # both paths ran
    assert torch.equal(top_p_filter(logits, top_p), want)  # the default candidates


def test_draw_samples_the_softmax_and_never_a_filtered_token():
    from tinyllama.generate import draw

    logits = torch.tensor([2.0, 1.0, 0.0, float("-inf"), -1.0])
    n = 40_000
    picks = draw(logits.repeat(n, 1), torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=5).double() / n
    want = logits.softmax(-1).double()
    assert freq[3] == 0
    # 5 standard deviations of a binomial frequency: a wrong draw (argmin, no noise, logits not log-probs) fails
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-12), (freq, want)


def test_draw_never_returns_a_filtered_or_out_of_range_token_even_from_a_bad_search(monkeypatch):
    """A CUDA scan may add in an order that gives a zero-probability token an ulp of interval: the search
    landing there (forced here) or past the end (NaN logits) still yields a token in range with probability
    > 0 where there is one."""
    from tinyllama.generate import draw

    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [float("nan")] * 4])
    monkeypatch.setattr(torch, "searchsorted", lambda cdf, u, right=False: torch.tensor([[1], [4]]))
    picked = draw(logits, torch.Generator().manual_seed(0)).tolist()
    assert picked[0] == 2 and 0 <= picked[1] < 4


def test_given_uniforms_invert_each_rows_cdf_and_seeded_streams_are_the_hosts():
    """draw(uniforms=u) picks, per row, the first token whose cumulative probability exceeds u (the numbers
    decide, not any generator's state); SeededUniforms gives a seed's same numbers every time."""
    from tinyllama.generate import SeededUniforms, draw

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]))
    for u, want in (([0.0, 0.0], [0, 0]), ([0.49, 0.31], [0, 2]), ([0.51, 0.61], [1, 3]), ([0.999999, 0.05], [2, 0])):
        assert draw(logits, uniforms=torch.tensor(u, dtype=torch.float64)).tolist() == want, u
    with pytest.raises(ValueError, match="3 uniforms for 2 rows"):
        draw(logits, uniforms=torch.rand(3))
    a, b = SeededUniforms(7), SeededUniforms(7)
    assert a.take(5) == b.take(5) and SeededUniforms(7).take(3) != SeededUniforms(8).take(3)
    assert all(0 <= x < 1 for x in SeededUniforms(1).take(1000))


def test_bad_inputs_raise_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(GenerationError, match="empty"):
        generate(ours, [])
    with pytest.raises(GenerationError, match="context"):
        generate(ours, [1] * SMALL.max_seq_len, max_new_tokens=1)
    with pytest.raises(GenerationError, match="vocabulary"):
        generate(ours, [1, SMALL.vocab_size])
    with pytest.raises(GenerationError, match="min_p"):
        generate(ours, [1], min_p=2.0)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(ours, [1], stop=["x"])
    with pytest.raises(GenerationError, match="unknown sampling"):
        generate(ours, [1], nucleus=0.5)
    # NaN passes `x < 0` checks and inf passes `x > 0`: both are refused for every number
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(repetition_penalty=float("inf")),
                dict(top_p=float("nan")), dict(seed=2**64)):
        with pytest.raises(GenerationError, match=f"{next(iter(bad))} must be"):
            generate(ours, [1], **bad)
    assert generate(ours, [1, 2], max_new_tokens=0) == []
    with pytest.raises(GenerationError, match="triton_max_batch=8 sizes the Triton decode step"):
        DecodeEngine(ours, decode_kernels="torch", triton_max_batch=8)
    DecodeEngine(ours, decode_kernels="torch", triton_max_batch=0)  # 0: no Triton step, as asked


def test_stop_strings_cut_text_and_hold_back_partial_matches():
    from tinyllama.tokenizer import Tokenizer

    tok = Tokenizer()
    torch.manual_seed(3)
    model = _sharpen(Llama(ModelConfig.from_name("tinyllama-tiny")).eval(), 30.0)
    prompt = tok.encode("Once upon a time", bos=True)
    free = generate(model, prompt, max_new_tokens=25, stop_at_eos=False)
    text = tok.decode(prompt + free)[len(tok.decode(prompt)):]
    assert len(text) > 10
    stop = text[5:8]
    cut = text[: text.index(stop)]
    assert generate_text(model, tok, "Once upon a time", max_new_tokens=25, stop_at_eos=False, stop=[stop]) == cut
    # token level: ends with the token that completes the stop string
    cfg = SamplingConfig(max_new_tokens=25, stop_at_eos=False, stop=[stop])
    ids = list(generate_stream(model, prompt, cfg, tokenizer=tok))
    assert ids == free[: len(ids)] and len(ids) < len(free)
    assert stop in tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def test_text_streamer_holds_back_stop_prefixes():
    class FakeTok:
        def stream_decoder(self, prefix=()):
            class D:
                def put(self, t):
                    return ["Hel", "lo <", "|us", "er|> more"][t]
            return D()

    s = TextStreamer(FakeTok(), stop=["<|user|>"])
    pieces = [s.put(i) for i in range(4)]
    assert pieces == ["Hel", "lo ", "", ""] and s.stopped
    s2 = TextStreamer(FakeTok(), stop=["<|system|>"])
    assert "".join(s2.put(i) for i in range(4)) + s2.flush() == "Hello <|user|> more"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_engine_prefill_graph_replays_equal_first_run_cuda():
    """The compiled engine captures an unpadded prefill per shape when the shape comes again; replays give
    the same logits and cache as a run, and generation stays equal to the eager engine (fp32)."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=96, hidden_size=128, n_layers=2, n_heads=8, n_kv_heads=2,
                              intermediate_size=200, max_seq_len=128)).cuda().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    prompts = [torch.randint(0, 96, (11,)).tolist() for _ in range(3)]
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    want = [generate_batch(model, [p], cfg)[0] for p in prompts]
    engine = DecodeEngine(model, compile=True, decode_kernels="torch")
    got = [generate_batch(model, [p], cfg, engine=engine)[0] for p in prompts]
    assert got == want
    assert len(engine._prefill_graphs) == 1  # one shape: run, then captured, then replayed for prompt 3
    # the graph's inputs outlive the call that captured it (a freed input was reused memory: a device assert)
    junk = [torch.full((11,), 10**6, device="cuda", dtype=torch.long) for _ in range(256)]  # noqa: F841
    ids = torch.tensor([prompts[0]], device="cuda")
    with torch.inference_mode():
        first = engine.prefill(ids).clone()
        k0 = model.layers[1].self_attn.kv_cache.k[:, :, :11].clone()
        model.layers[1].self_attn.kv_cache.k.zero_()
        again = engine.prefill(ids)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(model.layers[1].self_attn.kv_cache.k[:, :, :11], k0, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_slot_prefill_graph_replays_equal_the_eager_model_cuda():
    """The serve engine's prefill form (rows into cache slots, right-padded, one column's logits each) runs
    compiled, is captured the second time its shape comes and replayed after: logits and cache rows equal
    the eager model's, and rows outside `slots` are untouched."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=96, hidden_size=128, n_layers=2, n_heads=8, n_kv_heads=2,
                              intermediate_size=200, max_seq_len=128)).cuda().eval()
    ref = copy.deepcopy(model)
    engine = DecodeEngine(model, compile=True, decode_kernels="torch")
    engine.ensure_cache(4, 64)
    ref.setup_cache(4, engine.cache_len_for(64))
    with torch.inference_mode():
        for round_ in range(3):  # run, capture (also runs), replay
            ids = torch.randint(0, 96, (2, 16), device="cuda")
            slots = torch.tensor([3, 1], device="cuda") if round_ != 1 else torch.tensor([0, 2], device="cuda")
            last = torch.tensor([15, 6 + round_], device="cuda")
            want = ref(ids, input_pos=torch.arange(16, device="cuda").expand(2, 16), slots=slots, logits_at=last)
            got = engine.prefill(ids, slots=slots, logits_at=last)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for a, b in zip(model.layers, ref.layers):
                torch.testing.assert_close(a.self_attn.kv_cache.k, b.self_attn.kv_cache.k, atol=1e-4, rtol=1e-4)
    assert len(engine._prefill_graphs) == 1
