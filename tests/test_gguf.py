"""GGUF export: layout, tokenizer metadata, quantized values, atomic writes, and llama.cpp itself when installed.

Without `llama-cpp-python` (it compiles llama.cpp, too slow for CI) the file is read back with the `gguf`
package, llama.cpp's rotary layout is checked against Meta's interleaved RoPE, and llama.cpp's SPM
tokenizer algorithm is replayed on the exported tokens/scores. With it, `test_llamacpp_roundtrip` runs.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tinyllama.config import ModelConfig  # noqa: E402
from tinyllama.convert.gguf import (  # noqa: E402
    convert_hf_dir_to_gguf,
    export_gguf,
    open_gguf,
    permute_to_interleaved,
    permute_to_rotate_half,
    read_gguf,
)
from tinyllama.errors import TinyLlamaError  # noqa: E402
from tinyllama.loading import load_gguf_model  # noqa: E402
from tinyllama.model import Llama, apply_rope, rope_cache  # noqa: E402
from tinyllama.tokenizer import Tokenizer  # noqa: E402

# Like tinyllama-tiny but with rows a whole number of 32-blocks everywhere, so every matrix quantizes.
CFG = ModelConfig.from_name("tinyllama-tiny", intermediate_size=192)
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(CFG).eval()


@pytest.fixture(scope="module")
def files(model, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tok, d / f"m-{q}.gguf", quant=q) for q in ("f16", "q8_0", "q4_0")}


_PARSED: dict = {}


def _read(path):
    """(reader, config, state, meta), parsed once per file: gguf's reader takes seconds for a 32k vocabulary."""
    if path not in _PARSED:
        reader = open_gguf(path)
        _PARSED[path] = (reader, *read_gguf(path, reader=reader))
    return _PARSED[path]


# ---- rotary layout ------------------------------------------------------------------------------
def _meta_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's original llama `apply_rotary_emb`: adjacent pairs (2i, 2i+1) as complex numbers."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.polar(torch.ones(len(pos), d // 2), torch.outer(pos.float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(xc * angles).flatten(-2)


def test_permutation_is_llamacpp_rotary_layout():
    torch.manual_seed(1)
    n_heads, d, hidden, T = 4, 16, 32, 7
    w = torch.randn(n_heads * d, hidden)
    x = torch.randn(T, hidden)
    pos = torch.arange(T)
    # HF / ours: rotate-half rotary on W x
    cos, sin = rope_cache(T, d, 10000.0)
    q_hf = apply_rope((x @ w.T).view(T, n_heads, d).transpose(0, 1), cos, sin)  # (H, T, d)
    # llama.cpp / Meta: interleaved rotary on W' x with W' the permuted rows
    w_il = torch.from_numpy(permute_to_interleaved(w.numpy(), n_heads))
    q_il = _meta_rope((x @ w_il.T).view(T, n_heads, d).transpose(0, 1), pos, 10000.0)
    # same vectors up to the same per-head permutation of coordinates, hence identical attention scores
    perm = torch.from_numpy(permute_to_interleaved(np.arange(n_heads * d), n_heads)).view(n_heads, d) % d
    torch.testing.assert_close(q_il, q_hf[:, :, perm[0]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_il @ q_il.transpose(1, 2), q_hf @ q_hf.transpose(1, 2), rtol=1e-4, atol=1e-4)
    # and the inverse is exact
    for heads in (1, 2, 4):
        a = np.random.default_rng(heads).standard_normal((heads * d, 5)).astype(np.float32)
        assert np.array_equal(permute_to_rotate_half(permute_to_interleaved(a, heads), heads), a)


# ---- read back ----------------------------------------------------------------------------------
def test_f16_file_metadata_and_exact_weights(files, model, tok):
    reader, cfg, state, meta = _read(files["f16"])
    assert cfg.replace(name=CFG.name) == CFG
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert meta["llama.attention.head_count_kv"] == CFG.n_kv_heads and meta["llama.rope.dimension_count"] == CFG.head_dim
    assert meta["tokenizer.ggml.model"] == "llama"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == CFG.vocab_size and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:3] == [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    assert tokens[3] == "<0x00>" and set(types[3:259]) == {int(gguf.TokenType.BYTE)}
    assert tokens[1000] == tok.id_to_token(1000) and types[1000] == int(gguf.TokenType.NORMAL)
    # weights: f16-rounded matrices, f32 norms, q/k back in the rotate-half layout
    for k, v in model.state_dict().items():
        want = v if v.dim() == 1 else v.half().float()
        assert torch.equal(state[k], want), k
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == Q.F32 and kinds["output_norm.weight"] == Q.F32
    assert kinds["blk.1.attn_q.weight"] == Q.F16 and kinds["token_embd.weight"] == Q.F16
    assert len(kinds) == 2 + 1 + 9 * CFG.n_layers
    # the stored q rows really are permuted (not the HF layout)
    raw = {t.name: t for t in reader.tensors}["blk.0.attn_k.weight"]
    stored = np.asarray(raw.data, dtype=np.float32).reshape(CFG.n_kv_heads * CFG.head_dim, CFG.hidden_size)
    hf = model.layers[0].self_attn.k_proj.weight.detach().half().float().numpy()
    assert np.array_equal(stored, permute_to_interleaved(hf, CFG.n_kv_heads)) and not np.array_equal(stored, hf)


@pytest.mark.parametrize("quant,qtype,bound", [("q8_0", Q.Q8_0, 1 / 127), ("q4_0", Q.Q4_0, 1 / 8)])
def test_quantized_values(files, model, quant, qtype, bound):
    reader, _, state, _ = _read(files[quant])
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == qtype and kinds["blk.0.attn_norm.weight"] == Q.F32
    assert kinds["output.weight"] == Q.Q8_0  # q4_0 keeps the head at higher precision, as llama-quantize does
    for k, v in model.state_dict().items():
        if v.dim() == 1:
            assert torch.equal(state[k], v)
            continue
        v = v.detach().float()
        # per 32-block error is at most about one quantization step of that block
        blocks = v.reshape(-1, 32)
        err = (state[k].reshape(-1, 32) - blocks).abs().max(dim=1).values
        step = blocks.abs().max(dim=1).values * (1 / 127 if k == "lm_head.weight" else bound)
        assert bool((err <= step * 1.01 + 1e-6).all()), k
    assert files["q4_0"].stat().st_size < files["q8_0"].stat().st_size < files["f16"].stat().st_size


# ---- tokenizer: replay llama.cpp's SPM algorithm on the exported vocabulary ----------------------
def _spm_tokenize(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's llm_tokenizer_spm: merge the best-scoring adjacent pair (leftmost on ties) while the
    joined piece is a token; unknown pieces are split back along their merges, then into byte tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    text = ("▁" + text).replace(" ", "▁")
    sym = list(text)  # pieces; None once merged into the left neighbour
    nxt = list(range(1, len(sym))) + [-1]
    prv = list(range(-1, len(sym) - 1))
    heap, rev = [], {}

    def push(left, right):
        if left < 0 or right < 0:
            return
        joined = sym[left] + sym[right]
        if joined in vocab:
            heapq.heappush(heap, (-scores[vocab[joined]], left, sym[left], sym[right]))
            rev[joined] = (sym[left], sym[right])

    for i in range(len(sym) - 1):
        push(i, i + 1)
    while heap:
        _, left, a, b = heapq.heappop(heap)
        right = nxt[left]
        if sym[left] != a or right < 0 or sym[right] != b:
            continue  # stale pair
        sym[left] = a + b
        sym[right] = None
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])

    out: list[int] = []

    def emit(piece):
        if piece in vocab:
            out.append(vocab[piece])
        elif piece in rev:
            emit(rev[piece][0])
            emit(rev[piece][1])
        else:
            out.extend(vocab[f"<0x{b:02X}>"] for b in piece.encode("utf-8"))

    i = 0
    while i >= 0:
        emit(sym[i])
        i = nxt[i]
    return out


STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and  double  spaces",
    "line one\nline two\n\n\ttabbed",
    "def f(x):\n    return x ** 2  # square",
    "Ünïcödé: naïve café, Straße, 東京, Москва",
    "emoji 🦙🚀 and a rare glyph 𝔘",
    "numbers 1234567890 3.14159 -42 and unusual words: antidisestablishmentarianism",
]


def test_exported_scores_make_llamacpp_spm_tokenize_like_us(files, tok):
    meta = _read(files["q4_0"])[3]
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    for s in STRINGS:
        assert _spm_tokenize(s, tokens, scores) == tok.encode(s), s
    # and the scores matter: equal scores (llama.cpp's own convert_hf_to_gguf for tokenizer.json) would not do
    flat = [-1000.0] * len(scores)
    assert any(_spm_tokenize(s, tokens, flat) != tok.encode(s) for s in STRINGS)


# ---- errors, atomic writes, the HF-directory entry point ----------------------------------------
def test_bad_inputs_and_no_half_written_file(model, tok, tmp_path, monkeypatch):
    with pytest.raises(TinyLlamaError, match="q3_k"):
        export_gguf(model, tok, tmp_path / "x.gguf", quant="q3_k")
    with pytest.raises(TinyLlamaError, match="directory"):
        export_gguf(model, tok, tmp_path, quant="f16")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(TinyLlamaError, match="junk.gguf"):
        read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(TinyLlamaError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")

    target = tmp_path / "keep.gguf"
    target.write_bytes(b"previous good file")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.quants, "quantize", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, tok, target, quant="q8_0")
    assert target.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf", "keep.gguf"]


def test_convert_hf_dir_and_load_back(model, tok, tmp_path):
    model.save_pretrained(tmp_path / "hf", tokenizer=tok)
    path = convert_hf_dir_to_gguf(tmp_path / "hf", tmp_path / "m.gguf", quant="f16")
    back = load_gguf_model(path)
    ids = torch.tensor([tok.encode("Hello there, general", bos=True)])
    rounded = Llama(CFG).eval()
    rounded.load_state_dict({k: v if v.dim() == 1 else v.half().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(back(ids), rounded(ids), rtol=1e-5, atol=1e-5)  # exactly the f16-rounded model
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=5e-3)


# ---- llama.cpp itself ---------------------------------------------------------------------------
def test_llamacpp_roundtrip(model, tok, tmp_path):
    pytest.importorskip("llama_cpp")
    from tinyllama.bench.gguf import roundtrip

    report = roundtrip(model, tok, quants=("f16", "q8_0", "q4_0"), n_tokens=16, strings=STRINGS,
                       prompts=["Once upon a time", "def fibonacci(n):", "The capital of France is"],
                       workdir=tmp_path, log=lambda *a: None)
    for quant, q in report["quants"].items():
        assert q["tokenizer_mismatches"] == [], (quant, q["tokenizer_mismatches"][:1])
        for r in q["prompts"]:
            # llama.cpp computes the same logits as our model on the file's own weights (it also rounds
            # activations to f16 / q8_0 blocks, hence the tolerance) ...
            assert r["max_abs_logit_diff_step0"] < 0.05 * r["logit_scale_step0"], (quant, r)
            # ... so greedy paths may part only where our top two logits nearly tie
            tie = 4 * r["max_abs_logit_diff_step0"]
            assert r["equal_gguf_weights"] or r["margin_at_divergence"] < tie, (quant, r)
    for r in report["quants"]["f16"]["prompts"]:
        assert r["equal_fp32"] and r["equal_gguf_weights"], r
    for r in report["quants"]["q8_0"]["prompts"]:
        assert r["agree_fp32"] >= 4, r
