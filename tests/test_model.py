"""Model correctness: logits parity with transformers both ways, KV cache, greedy generation, init, meta."""

import math

import pytest
import torch

from tinyllama import Llama, ModelConfig, generate

transformers = pytest.importorskip("transformers")

SMALL_GQA = ModelConfig(
    name="test-gqa", vocab_size=512, n_layers=3, hidden_size=96, n_heads=6, n_kv_heads=2, intermediate_size=200,
    max_seq_len=128,
)


def hf_model_from_config(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    # transformers' default init is tiny; scale weights up so logits differ meaningfully between tokens
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def test_their_weights_to_ours_logits_match(tmp_path):
    hf = hf_model_from_config(SMALL_GQA)
    hf.save_pretrained(tmp_path / "hf")
    ours = Llama.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max().item() < 1e-4


def test_our_weights_to_theirs_logits_match(tmp_path):
    torch.manual_seed(2)
    ours = Llama(SMALL_GQA).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    hf, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (2, 50))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert tok("Hello world!").input_ids == [1, 15043, 3186, 29991]


def test_sharded_save_and_bf16_load(tmp_path):
    torch.manual_seed(3)
    ours = Llama(SMALL_GQA).eval()
    ours.save_pretrained(tmp_path / "sharded", max_shard_size=200_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    back = Llama.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (1, 17))
    with torch.no_grad():
        assert torch.equal(ours(ids), back(ids))
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    ours.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    b = Llama.from_pretrained(tmp_path / "bf16")
    assert b.lm_head.weight.dtype == torch.bfloat16 and b.rope_cos.dtype == torch.float32
    f = Llama.from_pretrained(tmp_path / "bf16", dtype="float32")
    assert f.lm_head.weight.dtype == torch.float32


def test_loss_matches_cross_entropy_and_ignore_index():
    model = Llama(SMALL_GQA)
    ids = torch.randint(0, SMALL_GQA.vocab_size, (2, 16))
    targets = torch.randint(0, SMALL_GQA.vocab_size, (2, 16))
    targets[0, :5] = -100
    logits, loss = model(ids, targets)
    keep = targets != -100
    manual = -torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_kv_cache_incremental_equals_full_forward():
    torch.manual_seed(4)
    model = Llama(SMALL_GQA).eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(batch_size=2, max_len=64)
        # prefill 11 tokens, then 4 chunks of mixed sizes, then single tokens
        pieces = [11, 5, 1, 7, 1, 1, 4]
        outs, start = [], 0
        for n in pieces:
            pos = torch.arange(start, start + n)
            outs.append(model(ids[:, start:start + n], input_pos=pos))
            start += n
        inc = torch.cat(outs, dim=1)
        model.clear_cache()
    assert start == 30
    assert (inc - full).abs().max().item() < 1e-5


def test_per_row_cache_positions_equal_separate_single_row_forwards():
    """Rows of one batch at their own positions in their own cache rows (input_pos (B, T), with and without
    slots) give the logits each sequence gets alone with the (T,) cache form: a right-padded prefill into
    scattered slots, a chunk of 3 tokens per row (masked SDPA), then one token per row (one-token attention)
    with an idle padding row."""
    torch.manual_seed(13)
    model = Llama(SMALL_GQA).eval()
    lengths = [9, 3, 14]
    seqs = [torch.randint(0, SMALL_GQA.vocab_size, (n + 4,)) for n in lengths]
    with torch.no_grad():
        refs = []
        for s, n in zip(seqs, lengths):
            model.setup_cache(1, 64)
            pre = model(s[None, :n], input_pos=torch.arange(n))[0, -1]
            chunk = model(s[None, n:n + 3], input_pos=torch.arange(n, n + 3))[0]
            one = model(s[None, n + 3:], input_pos=torch.tensor([n + 3]))[0, -1]
            refs.append((pre, chunk, one))

        model.setup_cache(5, 64)
        slots = torch.tensor([2, 0, 1])  # batch row r lives in cache row slots[r]; rows 3 and 4 stay unused
        T = max(lengths)
        ids = torch.zeros(3, T, dtype=torch.long)
        for r, (s, n) in enumerate(zip(seqs, lengths)):
            ids[r, :n] = s[:n]
        pre = model(ids, input_pos=torch.arange(T).expand(3, T), slots=slots,
                    logits_at=torch.tensor(lengths) - 1)
        assert pre.shape == (3, SMALL_GQA.vocab_size)
        starts = torch.tensor(lengths)[:, None]
        chunk = model(torch.stack([s[n:n + 3] for s, n in zip(seqs, lengths)]),
                      input_pos=starts + torch.arange(3), slots=slots)
        for layer in model.layers:  # nothing was written outside the addressed cache rows
            assert not layer.self_attn.kv_cache.k[3:].any() and not layer.self_attn.kv_cache.v[3:].any()
        # without slots batch row b is cache row b: reorder the rows, and add an idle row 3 at position 0
        order = [1, 2, 0]  # the sequences in cache rows 0, 1, 2
        ids = torch.tensor([[seqs[i][lengths[i] + 3]] for i in order] + [[0]])
        pos = torch.tensor([[lengths[i] + 3] for i in order] + [[0]])
        one = model(ids, input_pos=pos)[:, -1]
        model.clear_cache()
    for r in range(3):
        assert (pre[r] - refs[r][0]).abs().max() < 1e-5
        assert (chunk[r] - refs[r][1]).abs().max() < 1e-5
    for b, i in enumerate(order):
        assert (one[b] - refs[i][2]).abs().max() < 1e-5
    assert torch.isfinite(one[3]).all()


def test_prefill_from_start_equals_the_masked_prefill_and_writes_the_same_cache(monkeypatch):
    """from_start (a prompt at positions 0..T-1, attending causally over its own keys) gives the masked
    form's logits and cache, in the (T,) and the slots form, and the next tokens see the same cache. It only
    writes the cache: the slots form's gathered copy of the cache rows (`KVCache.update`) is not made."""
    from tinyllama.model import KVCache

    gathers = []
    update = KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, *a: gathers.append(len(a)) or update(self, *a))
    torch.manual_seed(17)
    model = Llama(SMALL_GQA).eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (3, 12))
    nxt = torch.randint(0, SMALL_GQA.vocab_size, (3, 1))
    slots = torch.tensor([3, 0, 2])
    results = {}
    with torch.no_grad():
        for from_start in (False, True):
            model.setup_cache(3, 64)
            model.layers[0].self_attn.kv_cache.k.normal_()  # stale keys past the prompt must not be seen
            pre = model(ids, input_pos=torch.arange(12), from_start=from_start)
            one = model(nxt, input_pos=torch.tensor([12]))
            caches = [getattr(layer.self_attn.kv_cache, kv)[:, :, :13].clone() for layer in model.layers for kv in "kv"]
            model.setup_cache(4, 64)
            pos = torch.arange(12).expand(3, 12)
            gathers.clear()
            slot_pre = model(ids, input_pos=pos, slots=slots, logits_at=torch.tensor([11, 5, 8]), from_start=from_start)
            assert len(gathers) == (0 if from_start else SMALL_GQA.n_layers)
            caches += [getattr(layer.self_attn.kv_cache, kv)[:, :, :12].clone() for layer in model.layers for kv in "kv"]
            results[from_start] = (pre, one, caches, slot_pre)
        model.clear_cache()
    masked, causal = results[False], results[True]
    for a, b in zip(masked[:2] + (masked[3],), causal[:2] + (causal[3],)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(masked[2], causal[2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_mask"):
        model.setup_cache(3, 64)
        model(ids, input_pos=torch.arange(12), key_mask=torch.ones(3, 64, dtype=torch.bool), from_start=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_from_start_runs_on_the_flash_kernel_cuda():
    # With GQA a masked SDPA has only the math kernel (fp32 scores); the prompt's causal pass takes flash.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(17)
    model = Llama(SMALL_GQA).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        model.setup_cache(2, 64)
        masked = model(ids, input_pos=torch.arange(16, device="cuda"))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            causal = model(ids, input_pos=torch.arange(16, device="cuda"), from_start=True)
            with pytest.raises(RuntimeError):
                model(ids, input_pos=torch.arange(16, device="cuda"))
    torch.testing.assert_close(causal.float(), masked.float(), rtol=0.05, atol=0.05)


def test_left_padded_batch_matches_unpadded():
    torch.manual_seed(5)
    model = Llama(SMALL_GQA).eval()
    a = torch.randint(3, SMALL_GQA.vocab_size, (1, 12))
    b = torch.randint(3, SMALL_GQA.vocab_size, (1, 7))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
        pad = 12 - 7
        batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
        key_mask = torch.ones(2, 12, dtype=torch.bool)
        key_mask[1, :pad] = False
        rope_pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(batch, rope_pos=rope_pos, key_mask=key_mask)
    assert torch.isfinite(out).all()
    assert (out[0, -1] - ref_a).abs().max() < 1e-5
    assert (out[1, -1] - ref_b).abs().max() < 1e-5


def test_greedy_generation_equals_transformers(tmp_path):
    torch.manual_seed(6)
    ours = Llama(SMALL_GQA).eval()
    ours.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for prompt in ([1, 5, 9, 200, 17], [1, 300]):
        mine = generate(ours, prompt, max_new_tokens=40, temperature=0.0, stop_at_eos=False)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                              pad_token_id=0, min_new_tokens=40)
        theirs = out[0, len(prompt):].tolist()
        assert mine == theirs


def test_generation_stops_at_eos_and_respects_context():
    from tinyllama import SamplingConfig, generate_stream

    torch.manual_seed(7)
    model = Llama(SMALL_GQA).eval()
    free = generate(model, [1, 7, 8], max_new_tokens=10, stop_at_eos=False)
    stop = free[3]
    first = free.index(stop)
    out = list(generate_stream(model, [1, 7, 8], SamplingConfig(max_new_tokens=10), eos_id=stop))
    assert out == free[:first]  # EOS ends generation and is not returned
    long = generate(model, list(range(3, 120)), max_new_tokens=50, stop_at_eos=False)
    assert len(long) == SMALL_GQA.max_seq_len - 117


def test_sampling_seed_is_reproducible():
    model = Llama(SMALL_GQA).eval()
    a = generate(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    b = generate(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    c = generate(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=8, stop_at_eos=False)
    assert a == b and a != c


def test_init_statistics():
    cfg = ModelConfig.from_name("tinyllama-demo")
    model = Llama(cfg)
    std = math.sqrt(2 / (5 * cfg.hidden_size))
    proj = 1 / math.sqrt(cfg.hidden_size) / cfg.n_layers
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - std) < 0.05 * std
    assert abs(model.embed_tokens.weight.std().item() - std) < 0.05 * std
    assert abs(model.layers[0].self_attn.o_proj.weight.std().item() - proj) < 0.05 * proj
    assert abs(model.layers[1].mlp.down_proj.weight.std().item() - proj) < 0.05 * proj
    assert torch.equal(model.norm.weight, torch.ones(cfg.hidden_size))


def test_meta_build_then_materialise():
    cfg = ModelConfig.from_name("tinyllama-tiny")
    with torch.device("meta"):
        model = Llama(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    ref = Llama(cfg)
    assert torch.equal(model.rope_cos, ref.rope_cos)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.isfinite(model(ids)).all()


def test_one_token_attention_equals_sdpa_with_mask():
    from tinyllama.model import one_token_attention

    torch.manual_seed(11)
    for mask_rows in (1, 3):  # one causal row for the batch, or per-row padding masks
        q = torch.randn(3, 6, 1, 16, dtype=torch.float64)
        k, v = torch.randn(3, 2, 40, 16, dtype=torch.float64), torch.randn(3, 2, 40, 16, dtype=torch.float64)
        mask = torch.rand(mask_rows, 1, 1, 40) < 0.7
        mask[..., 0] = True
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        got = one_token_attention(q, k, v, mask)
        assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-12


def test_fused_projections_give_the_same_logits_and_refuse_to_save(tmp_path):
    from tinyllama.errors import TinyLlamaError

    torch.manual_seed(12)
    model = Llama(SMALL_GQA).eval()
    ids = torch.randint(0, SMALL_GQA.vocab_size, (2, 20))
    n_params = model.num_params()
    with torch.no_grad():
        ref = model(ids)
        model.fuse_projections()
        got = model(ids)
    assert model.projections_fused and model.num_params() == n_params
    assert not hasattr(model.layers[0].self_attn, "q_proj") and not hasattr(model.layers[0].mlp, "up_proj")
    assert (got - ref).abs().max().item() < 1e-5
    with pytest.raises(TinyLlamaError, match="fuse_projections"):
        model.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_fused_model_is_refused_where_separate_weights_are_needed(tmp_path):
    from tinyllama.errors import TinyLlamaError
    from tinyllama.finetune.lora import apply_lora
    from tinyllama.kernels import apply_fast_path

    model = Llama(SMALL_GQA).eval().fuse_projections()
    for use in (lambda: apply_lora(model), lambda: apply_fast_path(model)):
        with pytest.raises(TinyLlamaError, match="fuse_projections"):
            use()
    gguf = pytest.importorskip("gguf")  # noqa: F841
    from tinyllama.convert.gguf import export_gguf
    from tinyllama.tokenizer import Tokenizer

    with pytest.raises(TinyLlamaError, match="fuse_projections"):
        export_gguf(model, Tokenizer(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
