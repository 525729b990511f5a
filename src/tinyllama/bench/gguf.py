"""`tinyllama bench gguf`: the llama.cpp round trip of our GGUF export, with llama.cpp itself as the oracle.

For each of f16, q8_0, q4_0: export a model with `export_gguf`, load the file with `llama-cpp-python`,
then check that (1) llama.cpp tokenizes a set of strings exactly as our tokenizer does, and (2) its greedy
continuation of several prompts equals ours. "Ours" is computed twice: with the original fp32 weights and
with the GGUF's own (dequantized) weights. Greedy decoding can flip where the top two logits nearly tie,
so the smallest top-1/top-2 margin on our path is printed next to llama.cpp's logit error: a mismatch
is only excusable where that margin is below the error.

Needs `pip install llama-cpp-python` (compiles llama.cpp; see BENCHMARKS.md for the time it takes).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from tinyllama.cli import _args as flag
from tinyllama.hub import check_model_dir

TOKENIZER_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and  double  spaces",
    "line one\nline two\n\n\ttabbed",
    "def f(x):\n    return x ** 2  # square",
    "Ünïcödé: naïve café, Straße, 東京, Москва",
    "emoji 🦙🚀 and a rare glyph 𝔘",
    "numbers 1234567890 3.14159 -42",
    "It's a <b>bold</b> move; isn't it?",
    "I was born in 1990.  ",
]

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "In 1492, Columbus",
    "Call me Ishmael. Some years ago",
]


def load_llamacpp(path, n_ctx: int, vocab_only: bool = False):
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        from tinyllama.errors import TinyLlamaError

        raise TinyLlamaError("the llama.cpp round trip needs `pip install llama-cpp-python` (builds llama.cpp)") from None
    return LlamaCpp(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True,
                    vocab_only=vocab_only, verbose=False)


def llamacpp_tokenize(llm, text: str) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def llamacpp_greedy(llm, prompt_ids: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation by llama.cpp's own logits (argmax), EOS ignored; returns (ids, first logits)."""
    llm.reset()
    llm.eval(list(prompt_ids))
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    logits, out = first, []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        llm.eval([tok])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return out, first


@torch.inference_mode()
def our_greedy(model, prompt_ids: Sequence[int], n: int) -> tuple[list[int], list[float], np.ndarray]:
    """Greedy continuation (EOS ignored), the top-1/top-2 logit margin at each step, the first logits."""
    ids = torch.tensor([list(prompt_ids)])
    out, margins, first = [], [], None
    for _ in range(n):
        logits = model(ids)[0, -1].float()
        if first is None:
            first = logits.numpy().copy()
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        tok = int(logits.argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out, margins, first


def _agree(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def roundtrip(model, tokenizer, quants=("f16", "q8_0", "q4_0"), n_tokens: int = 32,
              prompts: Sequence[str] = PROMPTS, strings: Sequence[str] = TOKENIZER_STRINGS,
              workdir: Optional[Path] = None, log=print) -> dict:
    """Export, load in llama.cpp, compare. Returns a JSON-able report (see `run` for the checks)."""
    from tinyllama.convert.gguf import export_gguf
    from tinyllama.loading import load_gguf_model

    model = model.float().eval()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="tinyllama-gguf-"))
    prompt_ids = [tokenizer.encode(p, bos=True) for p in prompts]
    n_ctx = max(len(p) for p in prompt_ids) + n_tokens + 8
    ours_fp32 = [our_greedy(model, p, n_tokens) for p in prompt_ids]
    report = {"model": model.config.name, "params": model.num_params(), "n_tokens": n_tokens, "quants": {}}
    for quant in quants:
        t0 = time.perf_counter()
        path = export_gguf(model, tokenizer, workdir / f"model-{quant}.gguf", quant=quant)
        export_s = time.perf_counter() - t0
        llm = load_llamacpp(path, n_ctx)
        tok_mismatch = []
        for s in strings:
            theirs, ours = llamacpp_tokenize(llm, s), tokenizer.encode(s)
            if theirs != ours:
                tok_mismatch.append({"text": s, "llama.cpp": theirs, "ours": ours})
        deq = load_gguf_model(path)  # our model on exactly the GGUF's weights
        rows = []
        for text, ids, (ref32, margin32, _) in zip(prompts, prompt_ids, ours_fp32):
            theirs, first_theirs = llamacpp_greedy(llm, ids, n_tokens)
            ours_q, margins_q, first_ours_q = our_greedy(deq, ids, n_tokens)
            k = _agree(theirs, ours_q)
            rows.append({
                "prompt": text,
                "agree_fp32": _agree(theirs, ref32),
                "agree_gguf_weights": _agree(theirs, ours_q),
                "equal_fp32": theirs == ref32,
                "equal_gguf_weights": theirs == ours_q,
                "min_margin_gguf_weights": round(min(margins_q), 5),
                # our top-1/top-2 margin where llama.cpp first picks another token (None: never)
                "margin_at_divergence": margins_q[k] if k < n_tokens else None,
                "max_abs_logit_diff_step0": float(np.abs(first_theirs - first_ours_q).max()),
                "logit_scale_step0": float(np.abs(first_ours_q).max()),
            })
        del llm
        q = {"file_mb": round(path.stat().st_size / 2**20, 2), "export_s": round(export_s, 2),
             "tokenizer_strings": len(strings), "tokenizer_mismatches": tok_mismatch, "prompts": rows}
        report["quants"][quant] = q
        log(f"{quant:5s} {q['file_mb']:8.2f} MiB  tokenizer {len(strings) - len(tok_mismatch)}/{len(strings)} equal  "
            f"greedy equal (fp32 / gguf weights): {sum(r['equal_fp32'] for r in rows)}/{len(rows)} / "
            f"{sum(r['equal_gguf_weights'] for r in rows)}/{len(rows)}  "
            f"first tokens agreeing (min over prompts): {min(r['agree_fp32'] for r in rows)}  "
            f"max |Δlogit| step 0: {max(r['max_abs_logit_diff_step0'] for r in rows):.2e}  "
            f"min margin: {min(r['min_margin_gguf_weights'] for r in rows):.2e}")
    return report


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory (default: a random-weight preset)")
    p.add_argument("--preset", default="tinyllama-demo", help="random-weight preset when no --model (default tinyllama-demo)")
    p.add_argument("--seed", type=flag.seed, default=0)
    p.add_argument("--tokens", type=flag.positive_int, default=32, help="greedy tokens per prompt")
    p.add_argument("--quants", default="f16,q8_0,q4_0")
    p.add_argument("--q8-first", type=flag.nonnegative_int, default=8, help="q8_0 must agree with ours on this many first tokens")
    p.add_argument("--json", help="write the full report here")


def run(args) -> int:
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama
    from tinyllama.tokenizer import Tokenizer

    torch.manual_seed(args.seed)
    if args.model:
        from tinyllama.model import Llama

        model, tok = Llama.from_pretrained(args.model, dtype=torch.float32), Tokenizer(check_model_dir(args.model))
    else:
        model, tok = Llama(ModelConfig.from_name(args.preset)), Tokenizer()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}; model {model.config.name} ({model.num_params() / 1e6:.1f} M params), "
          f"{args.tokens} greedy tokens x {len(PROMPTS)} prompts")
    report = roundtrip(model, tok, quants=tuple(args.quants.split(",")), n_tokens=args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = True
    for quant, q in report["quants"].items():
        if q["tokenizer_mismatches"]:
            ok = False
            print(f"FAIL {quant}: tokenization differs: {q['tokenizer_mismatches'][0]}", file=sys.stderr)
        for r in q["prompts"]:
            if quant == "f16" and not r["equal_fp32"]:
                ok = False
                print(f"FAIL f16: greedy differs for {r['prompt']!r}: {r}", file=sys.stderr)
            if quant == "q8_0" and r["agree_fp32"] < min(args.q8_first, args.tokens):
                ok = False
                print(f"FAIL q8_0: only {r['agree_fp32']} first tokens agree for {r['prompt']!r}", file=sys.stderr)
    print("llama.cpp round trip:", "OK" if ok else "FAILED")
    return 0 if ok else 1
