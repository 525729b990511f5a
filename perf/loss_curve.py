"""Loss curves of the fast path against transformers' LlamaForCausalLM on the same data, init and schedule.

python perf/loss_curve.py --data .perfdata/tokens.npy --steps 200 --perturbed-seeds 2
Runs, all from the same initial weights (ours, copied into transformers through the HF state-dict adapter),
the same batches and the same AdamW step (clip factor inside fused AdamW), bf16 autocast:
  hf          transformers LlamaForCausalLM (SDPA), loss from its logits: the reference
  reference   our plain model (no fast path)
  fast        our fast path (apply_fast_path defaults: fused blocks, fused linear + cross-entropy)
  hf-perturbed-k   transformers again with every initial weight perturbed by one bf16 rounding (relative
              N(0, 2^-9)): how far two runs that differ only at bf16 noise level drift apart.
The bound (stated before the run, perf/NOTES.md): fast - hf within 1.25x the largest perturbed - hf
distance, on the mean |Δ| over steps 11.. and on the max |Δ| of 10-step means.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tinyllama.bench import train as bt
from tinyllama.kernels import KernelConfig


def hf_loss_on_targets(model, ids, targets):
    """transformers' model on exactly our (inputs, targets): its logits, the same cross-entropy as ours."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def hf_copy(model, cfg, dev):
    """transformers' LlamaForCausalLM holding `model`'s weights (our HF state-dict adapter)."""
    from tinyllama.convert.hf import to_hf_state_dict

    hf = bt.build_hf(cfg, dev)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def run(name, cfg, dev, batches, steps, lr, warmup, perturb=0.0, fast=False, seed=123, hf=False, kernels=None):
    model = bt.build_ours(cfg, dev, (kernels or KernelConfig()) if fast else None, fast=fast, seed=0)
    loss_of = bt._ours_loss
    if hf:
        model, loss_of = hf_copy(model, cfg, dev), hf_loss_on_targets
    if perturb:
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, device=dev, generator=g))
    opt, schedule = bt.build_optimizer(model, lr=lr, warmup_steps=warmup, max_steps=steps)
    step = bt.make_train_step(model, opt, loss_of, dev, trainer_step=True)
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
    ap.add_argument("--perturbed-seeds", type=int, default=2, help="perturbed transformers runs (noise estimate)")
    ap.add_argument("--fp32-residual-run", action="store_true", help="also the fast path with an fp32 residual")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "loss_curve.json"))
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bt.load_model_config(a.config)
    batches = bt.TokenBatches(cfg.vocab_size, a.seq_len, a.micro_batch, data=a.data)
    runs: dict = {}

    def save(summary=None) -> None:  # after every run: a call cut short keeps the curves it finished
        with open(a.out + ".tmp", "w") as f:
            json.dump({"args": vars(a), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                       "runs": runs, "summary": summary}, f)
        os.replace(a.out + ".tmp", a.out)

    plan = [("hf", {"hf": True}), ("fast", {"fast": True}), ("reference", {})]
    if a.fp32_residual_run:  # which numerics change a difference comes from: the bf16 residual stream?
        plan.append(("fast-fp32-residual", {"fast": True, "kernels": KernelConfig(bf16_residual=False)}))
    plan += [(f"hf-perturbed-{k}", {"hf": True, "perturb": 2.0**-9, "seed": 123 + k}) for k in range(a.perturbed_seeds)]
    for name, kw in plan:
        runs[name] = run(name, cfg, dev, batches, a.steps, a.lr, a.warmup, **kw)
        save()
    summary = {f"{name}_vs_hf": compare(losses, runs["hf"]) for name, losses in runs.items() if name != "hf"}
    noise = [summary[f"hf-perturbed-{k}_vs_hf"] for k in range(a.perturbed_seeds)]
    verdict = {}
    for key in ("mean_abs", "max_abs_smoothed10"):
        bound = 1.25 * max(n[key] for n in noise) if noise else float("nan")
        verdict[key] = {"fast": summary["fast_vs_hf"][key], "bound": bound, "within": summary["fast_vs_hf"][key] <= bound}
    summary["bound_1.25x_max_perturbed"] = verdict
    print(json.dumps(summary, indent=1))
    names = list(runs)
    print(f"{'step':>5} " + " ".join(f"{n:>16}" for n in names))
    for i in list(range(0, a.steps, max(1, a.steps // 20))) + [a.steps - 1]:
        print(f"{i + 1:>5} " + " ".join(f"{runs[n][i]:>16.4f}" for n in names))
    save(summary)


if __name__ == "__main__":
    main()
