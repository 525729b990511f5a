"""Where the persistent batch-1 decode step's time goes (kernels/decode_persistent.py), beside the layered one.

python perf/persistent_profile.py [--pos 256] [--out persistent_profile.json]
A random-weight TinyLlama-1.1B (bf16, fused), one row at position `pos`. First `TritonDecodeStep`'s own
tuning: the whole step as CUDA-graph replays with the layered kernels and with each persistent
configuration (µs). Then each persistent configuration once more with the GPU clock stamped around every
stage of every program (`PersistentDecode.profile`): per stage kind, summed over the 22 layers, the time
from the first program's start to the last one's end (`work`) and from there to the next stage's first
start (`sync`, the grid barrier), with the programs, registers and spills of the compiled kernel.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from triton_step_profile import random_decode_model  # perf/ is on the path when run as a script

from tinyllama.kernels import decode_persistent as P
from tinyllama.kernels.decode import TritonDecodeStep, _step_name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pos", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "persistent_profile.json"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    model = random_decode_model(dev)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    model.setup_cache(1, 512)
    ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.full((1,), a.pos, dtype=torch.long, device=dev)
    report = {"device": torch.cuda.get_device_name(dev), "pos": a.pos, "weight_bytes": weight_bytes}
    with torch.inference_mode():
        step = TritonDecodeStep(model, use_graph=False, persistent=None)  # tunes: layered vs persistent
        step.step(ids, pos)
        report["step_us"] = step.step_times
        report["chosen"] = step.kernels
        print(f"{report['device']}: whole step, graph replays (µs); chosen: {report['chosen']}")
        for name, us in sorted(step.step_times.items(), key=lambda kv: kv[1]):
            print(f"  {name:<44} {us:8.1f} µs  {weight_bytes / us / 1e6:6.2f} TB/s of weights")
        report["stages"] = {}
        for cfg in P.PERSISTENT_CANDIDATES:
            runner = P.PersistentDecode(model, cfg)
            step.persistent = runner
            try:
                prof = runner.profile(step._layers)
            except Exception as e:  # a configuration this card cannot run: say so, go on
                print(f"  {_step_name(cfg)}: {type(e).__name__}: {e}"[:300])
                continue
            prof.update(registers=runner.registers, spilled=runner.spilled, failed=runner.failed())
            report["stages"][_step_name(cfg)] = prof
            work = sum(v["work_us"] for k, v in prof.items() if isinstance(v, dict))
            sync = sum(v["sync_us"] for k, v in prof.items() if isinstance(v, dict))
            print(f"\n  {_step_name(cfg)}: {prof['programs']} programs, {runner.registers} registers, "
                  f"{runner.spilled} spilled; span {prof['span_us']} µs = work {work:.1f} + sync {sync:.1f}")
            for k, v in prof.items():
                if isinstance(v, dict):
                    print(f"    {k:<10} work {v['work_us']:8.1f} µs   sync after {v['sync_us']:7.1f} µs")
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
