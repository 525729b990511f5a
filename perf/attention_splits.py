"""Where do the decode attention's cache splits pay? (issue 15, batch-1 and batch-32 decode goals)

python perf/attention_splits.py [--rows 1,32] [--positions 128,384,1024,2000] [--out attention_splits.json]

The step's tuning (`TritonDecodeStep._tune_attention`) times ATTENTION_CANDIDATES once, at the first step's
positions. On an H100 at prompt 128 (2026-12-06) the unsplit kernel won, 65 µs for 22 layers against 125-145
for the splits. This times every candidate at several cache lengths and batch sizes, each over 22 layers'
caches at the 1.1B's shape (32 query / 4 kv heads of 64) as CUDA-graph replays, so that whether splits pay at
long contexts (and whether the tuning's one position is enough) is measured, not guessed. Each candidate's
output is checked against the unsplit kernel's first. Without CUDA (Triton's interpreter: TRITON_INTERPRET=1)
it runs the checks at a small shape and times nothing.
"""

from __future__ import annotations

import argparse
import json

import torch

from tinyllama.checks import POSITIVE_INT
from tinyllama.cli._args import number_list
from tinyllama.kernels.decode import (ATTENTION_CANDIDATES, AttentionConfig, SplitKWorkspace, decode_attention,
                                      pdl_supported, time_candidates)

LAYERS = 22


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=number_list(**POSITIVE_INT), default=[1, 32])
    ap.add_argument("--positions", type=number_list(**POSITIVE_INT), default=[128, 384, 1024, 2000])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    # the 1.1B's heads on CUDA; a small shape under the interpreter (numpy runs every lane)
    heads, kv, dim, slots, layers = (32, 4, 64, 2048, LAYERS) if cuda else (8, 2, 16, 64, 2)
    positions = [p for p in args.positions if p < slots] if cuda else [3, 40]
    candidates = ATTENTION_CANDIDATES if cuda else tuple(AttentionConfig(*c) for c in ((1, 32), (2, 16), (4, 16)))
    pdl = pdl_supported(device)  # as the step launches them (the L2 prefetch acts only with PDL)
    width = (heads + 2 * kv) * dim
    torch.manual_seed(0)
    cos = torch.randn(slots, dim, device=device)
    sin = torch.randn(slots, dim, device=device)
    workspace = SplitKWorkspace(device)
    results = []
    print(f"attention over {layers} layers, {heads}/{kv} heads of {dim}, cache {slots} slots, {dtype}; µs per "
          f"step (all layers), with the K/V bytes each step reads", flush=True)
    for rows in args.rows if cuda else [1, 3]:
        caches = [(torch.randn(rows, kv, slots, dim, device=device, dtype=dtype),
                   torch.randn(rows, kv, slots, dim, device=device, dtype=dtype)) for _ in range(layers)]
        qkv = torch.randn(rows, width, device=device, dtype=dtype)
        out = torch.empty(rows, heads * dim, device=device, dtype=dtype)
        for position in positions:
            # rows at different positions (as in a server's batch), the last one at `position`
            pos = torch.tensor([max(1, position - 7 * r) for r in range(rows)][::-1], device=device)

            def run(cfg, layer_caches=caches) -> None:
                for k, v in layer_caches:
                    decode_attention(qkv, k, v, pos, cos, sin, out, heads, kv, workspace=workspace, pdl=pdl,
                                     **cfg._asdict())

            run(candidates[0], caches[:1])
            want = out.float().clone()
            agree = {}
            for cfg in candidates[1:]:
                run(cfg, caches[:1])
                agree[cfg] = bool(torch.allclose(out.float(), want, atol=3e-2, rtol=3e-2))
            kv_bytes = 2 * layers * kv * dim * dtype.itemsize * int((pos + 1).sum())
            times = time_candidates(run, candidates) if cuda else {}
            row = {"rows": rows, "position": position, "kv_MB": round(kv_bytes / 1e6, 2),
                   "us": {cfg.name: round(t, 1) for cfg, t in times.items()},
                   "disagreeing": [cfg.name for cfg, ok in agree.items() if not ok]}
            best = min(times, key=times.get) if times else None
            if best:
                row["best"] = best.name
                row["best_TBps"] = round(kv_bytes / times[best] / 1e6, 2)
            results.append(row)
            cells = "  ".join(f"{k} {v:7.1f}" for k, v in row["us"].items()) or "(not timed: no CUDA)"
            print(f"  rows {rows:>2} pos {position:>5} ({row['kv_MB']:8.2f} MB): {cells}  best {row.get('best', '-')}"
                  f"{'  DISAGREE ' + ','.join(row['disagreeing']) if row['disagreeing'] else ''}", flush=True)
        del caches
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)", "results": results},
                      f, indent=1)
    if any(r["disagreeing"] for r in results):
        raise SystemExit("some split candidates disagree with the unsplit kernel (see DISAGREE above)")


if __name__ == "__main__":
    main()
