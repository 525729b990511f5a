"""Print the `tinyllama bench train` flags of the fastest `ours*` variant in a perf/gpu_perf.py --bench JSON."""

import json
import sys

# gpu_perf.py variant -> bench train flags (variants not listed here are not candidates)
FLAGS = {"ours": "", "ours-fa4": "--attention-backend fa4", "ours-graph": "--cuda-graph",
         "ours-fa4-graph": "--attention-backend fa4 --cuda-graph", "ours-tadamw": "--adamw-kernel triton",
         "ours-fa4-tadamw": "--attention-backend fa4 --adamw-kernel triton",
         "ours-fa4-graph-tadamw": "--attention-backend fa4 --cuda-graph --adamw-kernel triton",
         "ours-fa4-graph-tadamw-ce8k": "--attention-backend fa4 --cuda-graph --adamw-kernel triton --ce-chunk-rows 8192"}

rows = [r for r in json.load(open(sys.argv[1])).get("bench", [])
        if r.get("variant") in FLAGS and not r.get("error") and r.get("tokens_per_s") == r.get("tokens_per_s")]
print(FLAGS[max(rows, key=lambda r: r["tokens_per_s"])["variant"]] if rows else "")
