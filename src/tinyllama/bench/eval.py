"""`tinyllama bench eval`: multiple-choice scoring speed, tinyllama's scorer vs lm-evaluation-harness's `hf` backend.

Both score the same HellaSwag-shaped requests (a context of ~`--ctx-words` words, 4 endings) on the same
weights; the benchmark also checks that they pick the same answers. Prints one table row per backend.
"""

from __future__ import annotations

from tinyllama.errors import pip_extra
import random
import tempfile
import time
from pathlib import Path

from tinyllama.cli import _args as flag
from tinyllama.hub import check_model_dir


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory (default: a random --preset)")
    p.add_argument("--preset", default="tinyllama-demo", help="random-weight preset when no --model")
    p.add_argument("--items", type=flag.positive_int, default=64, help="questions (4 choices each)")
    p.add_argument("--ctx-words", type=flag.positive_int, default=60)
    p.add_argument("--batch-size", type=flag.positive_int, default=16)
    p.add_argument("--device", type=flag.device, default=None)
    p.add_argument("--dtype", type=flag.dtype, default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--skip-lm-eval", action="store_true")


WORDS = ("the a man woman dog ball river house green quickly slowly then after before runs jumps sits takes "
         "puts opens closes water tree road car blue small large bright dark first second").split()


def _requests(n: int, ctx_words: int, seed: int = 0) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = "Activity: " + " ".join(rnd.choice(WORDS) for _ in range(ctx_words)).capitalize() + "."
        for _ in range(4):
            out.append((ctx, " " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 25))) + "."))
    return out


def run(args) -> int:
    import torch

    from tinyllama.config import ModelConfig
    from tinyllama.eval.scoring import Scorer
    from tinyllama.loading import inference_device_and_dtype
    from tinyllama.model import Llama
    from tinyllama.tokenizer import Tokenizer

    device, dtype = inference_device_and_dtype(args.device, args.dtype)
    tmp = None
    if args.model:
        model_dir = check_model_dir(args.model)
    else:
        tmp = tempfile.TemporaryDirectory()
        model_dir = Path(tmp.name) / "model"
        torch.manual_seed(0)
        Llama(ModelConfig.from_name(args.preset)).save_pretrained(model_dir)
    reqs = _requests(args.items, args.ctx_words)
    rows = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model = Llama.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    scorer = Scorer(model, Tokenizer(model_dir), batch_size=args.batch_size)
    scorer.loglikelihood(reqs[:8])  # warm-up
    sync()
    t0 = time.perf_counter()
    ours = scorer.loglikelihood(reqs)
    sync()
    rows.append(("tinyllama", time.perf_counter() - t0, ours))
    del model, scorer
    if not args.skip_lm_eval:
        try:
            from lm_eval.api.instance import Instance
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            print(f"lm-eval not importable ({e}); {pip_extra('eval')} accelerate")
        else:
            lm = HFLM(pretrained=str(model_dir), dtype=str(dtype).replace("torch.", ""), device=str(device),
                      batch_size=args.batch_size)
            inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
            lm.loglikelihood(inst[:8], disable_tqdm=True)
            sync()
            t0 = time.perf_counter()
            theirs = lm.loglikelihood(inst, disable_tqdm=True)
            sync()
            rows.append(("lm-eval hf", time.perf_counter() - t0, theirs))
    n_tok = sum(len(ids) for ids in Tokenizer(model_dir).encode_batch([c + x for c, x in reqs], bos=True))
    print(f"{args.items} questions × 4 choices ({len(reqs)} requests, {n_tok:,} tokens) | model {model_dir if args.model else args.preset}"
          f" | {device} {str(dtype).replace('torch.', '')} | batch {args.batch_size}")
    print(f"{'backend':<12} {'seconds':>8} {'requests/s':>11} {'tokens/s':>10}")
    for name, s, _ in rows:
        print(f"{name:<12} {s:>8.2f} {len(reqs) / s:>11.1f} {n_tok / s:>10,.0f}")
    if len(rows) == 2:
        picks = [[max(range(4), key=lambda j: r[2][4 * i + j][0]) for i in range(args.items)] for r in rows]
        same = sum(a == b for a, b in zip(*picks))
        diff = max(abs(a[0] - b[0]) for a, b in zip(rows[0][2], rows[1][2]))
        print(f"same answer on {same}/{args.items} questions; max |Δ log-likelihood| {diff:.2e}")
    if tmp is not None:
        tmp.cleanup()
    return 0
