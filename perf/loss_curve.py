"""Loss curves of the fast path against the reference path on the same data, same init, same schedule.

python perf/loss_curve.py --data .perfdata/tokens.npy --steps 200
Three runs: the reference (plain model, unfused), the fast path (apply_fast_path defaults), and the
reference again with every initial weight perturbed by one bf16 rounding (relative N(0, 2^-9)): that
third run measures how far two runs that differ only at bf16 noise level drift apart, which is the
bound the fast path is held to (see perf/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tinyllama.bench import train as bt
from tinyllama.kernels import KernelConfig


def run(name, cfg, dev, batches, steps, lr, warmup, perturb=0.0, fast=False, seed=123):
    model = bt.build_ours(cfg, dev, KernelConfig() if fast else None, fast=fast, seed=0)
    if perturb:
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, device=dev, generator=g))
    opt, schedule = bt.build_optimizer(model, lr=lr, warmup_steps=warmup, max_steps=steps)
    step = bt.make_train_step(model, opt, bt._ours_loss, dev, trainer_step=True)
    batches.reset()
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        schedule(i)
        losses.append(step(batches.next()))
    losses = torch.stack(losses).float().cpu().tolist()
    print(f"{name}: {time.perf_counter() - t0:.0f}s, first {losses[0]:.4f}, last {losses[-1]:.4f}", flush=True)
    del model, opt, step
    bt._free(dev)
    return losses


def compare(a, b, skip=10):
    d = [abs(x - y) for x, y in zip(a, b)][skip:]
    r = [abs(x - y) / y for x, y in zip(a, b)][skip:]
    sa = [sum(a[i - 9 : i + 1]) / 10 for i in range(9, len(a))]
    sb = [sum(b[i - 9 : i + 1]) / 10 for i in range(9, len(b))]
    ds = [abs(x - y) for x, y in zip(sa, sb)]
    return {"mean_abs": sum(d) / len(d), "max_abs": max(d), "max_rel": max(r), "max_abs_smoothed10": max(ds),
            "final_smoothed10_delta": sa[-1] - sb[-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tinyllama-1.1b")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--data", default=None)
    ap.add_argument("--perturbed-seeds", type=int, default=1, help="perturbed reference runs (noise estimate)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "loss_curve.json"))
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bt.load_model_config(a.config)
    batches = bt.TokenBatches(cfg.vocab_size, a.seq_len, a.micro_batch, data=a.data)
    ref = run("reference", cfg, dev, batches, a.steps, a.lr, a.warmup)
    fast = run("fast", cfg, dev, batches, a.steps, a.lr, a.warmup, fast=True)
    noises = [run(f"reference-perturbed-{k}", cfg, dev, batches, a.steps, a.lr, a.warmup, perturb=2.0**-9, seed=123 + k)
              for k in range(a.perturbed_seeds)]
    noise = noises[0]
    summary = {"fast_vs_reference": compare(fast, ref), "perturbed_vs_reference": compare(noise, ref)}
    for k, other in enumerate(noises[1:], 1):
        summary[f"perturbed{k}_vs_reference"] = compare(other, ref)
        summary[f"fast_vs_perturbed{k}"] = compare(fast, other)
        summary[f"perturbed{k}_vs_perturbed0"] = compare(other, noise)
    summary["fast_vs_perturbed0"] = compare(fast, noise)
    print(json.dumps(summary, indent=1))
    print(f"{'step':>5} {'reference':>10} {'fast':>10} {'perturbed':>10}")
    for i in list(range(0, a.steps, max(1, a.steps // 20))) + [a.steps - 1]:
        print(f"{i + 1:>5} {ref[i]:>10.4f} {fast[i]:>10.4f} {noise[i]:>10.4f}")
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "reference": ref, "fast": fast, "perturbed": noise, "perturbed_all": noises,
                   "summary": summary}, f)


if __name__ == "__main__":
    main()
