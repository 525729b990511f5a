"""`tinyllama bench quantize`: perplexity change and decode speed of int8 / int4 weight-only quantization.

Quality needs a trained model: pass --model DIR (a Hugging Face directory, e.g. the demo's export), or let
the bench train a small model on the given corpus first (--train-steps). Perplexity is measured on held-out
text: the last --eval-tokens tokens of each corpus file, never used for the quick training.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from tinyllama.cli import _args as flag
from tinyllama.hub import check_model_dir
from tinyllama.errors import TinyLlamaError


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="trained Hugging Face model directory (default: train one quickly)")
    p.add_argument("--corpus", default=None,
                   help="directory of *.jsonl.zst text files (SlimPajama format); default ../shared/data/corpus")
    p.add_argument("--preset", default="tinyllama-tiny", help="preset to train when --model is not given")
    p.add_argument("--train-steps", type=flag.positive_int, default=300)
    p.add_argument("--seq-len", type=flag.positive_int, default=128)
    p.add_argument("--batch", type=flag.positive_int, default=8)
    p.add_argument("--eval-tokens", type=flag.positive_int, default=16384, help="held-out tokens per corpus file")
    p.add_argument("--schemes", default="int8,int4-32,int4-128")
    p.add_argument("--device", type=flag.device, default=None)
    p.add_argument("--threads", type=flag.positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--save", default=None, help="save the quickly trained model here (Hugging Face format)")
    p.add_argument("--json", default=None, help="write results to this JSON file")


def _read_texts(path: Path) -> list[str]:
    import zstandard

    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    texts = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.strip():
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TinyLlamaError(f"{path}: line {i + 1} is not a JSON object with a 'text' field") from None
    return texts


def load_corpus(directory: Path, tokenizer, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (train ids, held-out ids): each file's last eval_tokens tokens are held out."""
    files = sorted(directory.glob("*.jsonl.zst"))
    if not files:
        raise TinyLlamaError(f"{directory}: no *.jsonl.zst corpus files found; pass --corpus DIR")
    train, held = [], []
    for f in files:
        ids = []
        for text in _read_texts(f):
            ids.extend(tokenizer.encode(text, bos=True, eos=True))
        if len(ids) < 2 * eval_tokens:
            raise TinyLlamaError(f"{f}: only {len(ids)} tokens, need at least {2 * eval_tokens} (lower --eval-tokens)")
        train.append(torch.tensor(ids[:-eval_tokens]))
        held.append(torch.tensor(ids[-eval_tokens:]))
    return torch.cat(train), torch.cat(held)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch: int = 8) -> float:
    """Perplexity over non-overlapping windows of seq_len+1 tokens."""
    device = model.embed_tokens.weight.device
    n = (ids.numel() - 1) // seq_len
    total, count = 0.0, 0
    for s in range(0, n, batch):
        rows = [ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(s, min(n, s + batch))]
        x = torch.stack([r[:-1] for r in rows]).to(device)
        y = torch.stack([r[1:] for r in rows]).to(device)
        logits = model(x).float()
        total += torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                   reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def train_quick(preset: str, train_ids: torch.Tensor, steps: int, seq_len: int, batch: int, device) -> "torch.nn.Module":
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name(preset, max_seq_len=max(seq_len, 256))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([train_ids[s: s + seq_len] for s in starts]).to(device)
        y = torch.stack([train_ids[s + 1: s + seq_len + 1] for s in starts]).to(device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step:>4}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval()


def run(args) -> int:
    from tinyllama.generate import DecodeEngine, SamplingConfig, generate_batch
    from tinyllama.loading import inference_device_and_dtype
    from tinyllama.model import Llama
    from tinyllama.quantize import quantize_model, weight_bytes
    from tinyllama.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = Path(args.corpus) if args.corpus else Path.cwd().parent / "shared" / "data" / "corpus"
    if not corpus.is_dir():
        raise TinyLlamaError(f"{corpus}: corpus directory not found; pass --corpus DIR")
    model_dir = check_model_dir(args.model) if args.model else None  # a Hub id `org/name` too
    tok = Tokenizer(model_dir) if model_dir and (model_dir / "tokenizer.json").is_file() else Tokenizer()
    train_ids, held = load_corpus(corpus, tok, args.eval_tokens)
    print(f"bench quantize: corpus {corpus} ({train_ids.numel()} train / {held.numel()} held-out tokens)", flush=True)
    if args.model:
        model = Llama.from_pretrained(check_model_dir(args.model), dtype=torch.float32, device=device).eval()
        source = args.model
    else:
        model = train_quick(args.preset, train_ids, args.train_steps, args.seq_len, args.batch, device)
        source = f"{args.preset} trained {args.train_steps} steps x {args.batch}x{args.seq_len} tokens here"
        if args.save:
            model.save_pretrained(args.save, tokenizer=tok)
    result = {"model": source, "device": str(device), "threads": torch.get_num_threads(), "rows": []}

    def measure(name, m):
        ppl = perplexity(m, held, args.seq_len)
        eng = DecodeEngine(m)
        cfg = SamplingConfig(max_new_tokens=64, stop_at_eos=False)
        prompt = [held[:32].tolist()]
        generate_batch(m, prompt, cfg.replace(max_new_tokens=4), engine=eng)
        t0 = time.perf_counter()
        generate_batch(m, prompt, cfg, engine=eng)
        tps = 64 / (time.perf_counter() - t0)
        eng.release()
        row = {"name": name, "perplexity": round(ppl, 3), "weight_MB": round(weight_bytes(m) / 1e6, 2),
               "decode_tokens_per_s": round(tps, 1)}
        result["rows"].append(row)
        if args.json:
            tmp = args.json + ".tmp"
            Path(tmp).write_text(json.dumps(result, indent=2))
            os.replace(tmp, args.json)
        base = result["rows"][0]["perplexity"]
        print(f"  {name:<10} perplexity {ppl:9.3f} ({100 * (ppl / base - 1):+6.2f}%)  weights {row['weight_MB']:7.2f} MB"
              f"  batch-1 decode {tps:7.1f} tokens/s", flush=True)

    measure("fp32", model)
    if device.type == "cuda":
        measure("bf16", copy.deepcopy(model).to(torch.bfloat16))
    for spec in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        scheme, _, group = spec.partition("-")
        base = copy.deepcopy(model).to(inference_device_and_dtype(str(device))[1])
        measure(spec, quantize_model(base, scheme, int(group or 128)))
    if args.json:
        tmp = args.json + ".tmp"
        Path(tmp).write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return 0
