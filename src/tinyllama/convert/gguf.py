"""GGUF export for llama.cpp (and back again, for checking), written with the `gguf` package.

What llama.cpp needs that a Hugging Face directory does not say the same way:
- q/k projection rows in the interleaved rotary layout of Meta's original checkpoints. Hugging Face
  (and our model) use the rotate-half layout, so the rows are permuted exactly as llama.cpp's own
  `convert_hf_to_gguf.py` does (`permute`); k uses the key/value head count.
- the Llama (SentencePiece-style) tokenizer: tokens, scores, types, special ids, chat template.
  Our tokenizer is a `tokenizers` BPE JSON without SentencePiece scores. llama.cpp's SPM tokenizer
  merges the adjacent pair whose joined token has the highest score, so each token's score is minus
  the rank of the first BPE merge that produces it: the same merge order as the BPE, hence the same ids.
- quantized blocks: f16, q8_0 or q4_0 via `gguf.quants`; 1-D tensors (norms) stay f32 as in llama.cpp.

Files are written to a temporary name and renamed into place, so a crash never leaves half a GGUF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError, pip_extra
from tinyllama.fileio import atomic_file

QUANTS = ("f16", "q8_0", "q4_0")

# our parameter name (after "layers.{i}.") -> llama.cpp's tensor name (after "blk.{i}.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise TinyLlamaError(f"GGUF export needs the `gguf` package: {pip_extra('gguf')}") from None
    return gguf


def to_gguf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise TinyLlamaError(f"GGUF export: no llama.cpp name for tensor '{name}'")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def from_gguf_name(name: str) -> str:
    for ours, theirs in _GLOBAL_NAMES.items():
        if name == theirs:
            return ours
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    if not m or m.group(2) not in inverse:
        raise TinyLlamaError(f"GGUF file: unknown tensor '{name}' (not a llama model?)")
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}"


# ---- rotary layout ------------------------------------------------------------------------------
def permute_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rotate-half rows (HF) -> interleaved pairs (Meta / llama.cpp), per head. Same as llama.cpp's `permute`."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The exact inverse of `permute_to_interleaved`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer ----------------------------------------------------------------------------------
def llama_vocab(tokenizer, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, token types) for llama.cpp's SPM tokenizer, padded to the model's vocab_size."""
    gguf = _import_gguf()
    TT = gguf.TokenType
    if tokenizer._hf is not None:
        tj = json.loads(tokenizer._hf.to_str())
        model = tj["model"]
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            raise TinyLlamaError(
                "GGUF export: the tokenizer is not a Llama BPE with byte fallback "
                f"(type={model.get('type')!r}, byte_fallback={model.get('byte_fallback')!r}); llama.cpp could not reproduce it"
            )
        first_rank: dict[str, int] = {}
        for rank, merge in enumerate(model["merges"]):
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            first_rank.setdefault(a + b, rank)
        n_merges = len(model["merges"])

        def score(i: int, piece: str) -> float:
            # Merged tokens: -rank of their first merge. Single characters are never merge results; keep them
            # below all merges in id order, as SentencePiece does.
            return float(-first_rank[piece]) if piece in first_rank else float(-(n_merges + i))
    else:  # a SentencePiece model carries its own scores
        sp = tokenizer._sp

        def score(i: int, piece: str) -> float:
            return float(sp.get_score(i))

    special = {tokenizer.bos_id, tokenizer.eos_id}
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise TinyLlamaError(f"GGUF export: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(n):
        piece = tokenizer.id_to_token(i)
        if piece is None:
            raise TinyLlamaError(f"GGUF export: tokenizer has no token for id {i} (ids must be contiguous)")
        if i == tokenizer.unk_id:
            t, s = TT.UNKNOWN, 0.0
        elif i in special:
            t, s = TT.CONTROL, 0.0
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            t, s = TT.BYTE, 0.0
        else:
            t, s = TT.NORMAL, score(i, piece)
        tokens.append(piece.encode("utf-8"))
        scores.append(s)
        types.append(int(t))
    for k in range(1, vocab_size - n + 1):  # model rows beyond the tokenizer: unused, as llama.cpp pads
        tokens.append(f"[PAD{k}]".encode())
        scores.append(-1000.0)
        types.append(int(TT.UNUSED))
    return tokens, scores, types


# ---- export -------------------------------------------------------------------------------------
def _tensor_type(gguf, quant: str, name: str, shape: tuple[int, ...]):
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32  # norms: f32 in every llama.cpp file type
    want = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if quant == "q4_0" and name == "output.weight":
        # llama-quantize keeps the output head at higher precision (Q6_K); gguf-py cannot write Q6_K, Q8_0 is closer.
        want = Q.Q8_0
    if want != Q.F16:
        block = gguf.GGML_QUANT_SIZES[want][0]
        if shape[-1] % block:
            return Q.F16  # rows not a whole number of blocks: llama.cpp's converter falls back to f16 too
    return want


def check_gguf_target(out_path, overwrite: bool) -> None:
    """Refuse a directory, and an existing file unless `overwrite`, before any work is done."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise TinyLlamaError(f"{out_path}: is a directory; give the .gguf file to write")
    if out_path.exists() and not overwrite:
        raise TinyLlamaError(f"{out_path}: already exists; pass --overwrite to replace it, or choose another --out")


def export_gguf(model, tokenizer, out_path, quant: str = "f16", name: Optional[str] = None,
                overwrite: bool = True) -> Path:
    """Write `model` (a tinyllama Llama) and `tokenizer` as a llama.cpp GGUF file; returns the path.

    An existing file is replaced (atomically) only with `overwrite`."""
    return write_gguf(model.config, model.state_dict(), tokenizer, out_path, quant, name, overwrite)


def write_gguf(c: ModelConfig, state: dict, tokenizer, out_path, quant: str = "f16", name: Optional[str] = None,
               overwrite: bool = True) -> Path:
    """A config and our state dict (rotate-half q/k rows) as a llama.cpp GGUF file."""
    from tinyllama.convert.hf import refuse_fused

    refuse_fused(state, "GGUF export")
    gguf = _import_gguf()
    if quant not in QUANTS:
        raise TinyLlamaError(f"GGUF export: unknown --quant '{quant}'; choose one of: {', '.join(QUANTS)}")
    out_path = Path(out_path)
    check_gguf_target(out_path, overwrite)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    tokens, scores, types = llama_vocab(tokenizer, c.vocab_size)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama")
        w.add_name(name or (c.name if c.name not in ("custom", "hf") else "tinyllama"))
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_unk_token_id(tokenizer.unk_id)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True)  # Llama 2's normalizer prepends "▁"
        w.add_chat_template(tokenizer.chat_template)

        for key, tensor in state.items():
            if key == "lm_head.weight" and c.tie_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            gname = to_gguf_name(key)
            data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
            if key.endswith("q_proj.weight"):
                data = permute_to_interleaved(data, c.n_heads)
            elif key.endswith("k_proj.weight"):
                data = permute_to_interleaved(data, c.n_kv_heads)
            qtype = _tensor_type(gguf, quant, gname, data.shape)
            if qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, np.ascontiguousarray(data.astype(np.float16)))
            else:
                w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path


def convert_hf_dir_to_gguf(hf_dir, out_path, quant: str = "f16", overwrite: bool = True) -> Path:
    """A Hugging Face Llama directory (config.json + safetensors + tokenizer) -> GGUF file."""
    from tinyllama.convert.hf import read_hf_checkpoint
    from tinyllama.tokenizer import Tokenizer

    hf_dir = Path(hf_dir)
    config, state = read_hf_checkpoint(hf_dir)
    has_tok = any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return write_gguf(config, state, Tokenizer(hf_dir) if has_tok else Tokenizer(), out_path, quant=quant,
                      overwrite=overwrite)


# ---- reading back (checks, and loading a GGUF into tinyllama) ------------------------------------
def open_gguf(path):
    """A `gguf.GGUFReader` for path, with a one-line error for a missing or unreadable file."""
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise TinyLlamaError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise TinyLlamaError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200]})") from None


def read_gguf(path, reader=None) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """GGUF file -> (ModelConfig, our fp32 state dict in the rotate-half layout, metadata dict).

    Quantized tensors are dequantized; q/k rows are permuted back, so export->read is exact for f32 data.
    `reader`: an already open `gguf.GGUFReader` of path (parsing the 32k-token vocabulary takes seconds).
    """
    gguf = _import_gguf()
    path = Path(path)
    reader = reader if reader is not None else open_gguf(path)

    meta: dict = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # exotic types: skip, nothing here depends on them
            continue
    if meta.get("general.architecture") != "llama":
        raise TinyLlamaError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, expected 'llama'")

    def need(key):
        if key not in meta:
            raise TinyLlamaError(f"{path}: missing GGUF metadata '{key}'")
        return meta[key]

    tensor_names = {t.name for t in reader.tensors}
    n_embd = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    vocab = int(meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or 0))
    config = ModelConfig(
        name=str(meta.get("general.name", "gguf")),
        vocab_size=vocab,
        n_layers=int(need("llama.block_count")),
        hidden_size=n_embd,
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        intermediate_size=int(need("llama.feed_forward_length")),
        max_seq_len=int(need("llama.context_length")),
        norm_eps=float(f'{float(need("llama.attention.layer_norm_rms_epsilon")):.6g}'),  # stored as f32: undo the rounding
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
    )
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        ours = from_gguf_name(t.name)
        if ours.endswith("q_proj.weight"):
            data = permute_to_rotate_half(data, config.n_heads)
        elif ours.endswith("k_proj.weight"):
            data = permute_to_rotate_half(data, config.n_kv_heads)
        state[ours] = torch.from_numpy(np.ascontiguousarray(data))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return config, state, meta
