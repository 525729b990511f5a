"""One GPU call: why does the compiled decode step take ~1.7 ms, and which change brings it under 1 ms?

For each variant of the 1.1B bf16 model (batch 1, 128-token prompt, 256 new tokens, greedy):
  * generate tokens/s exactly as `tinyllama bench generate` counts them (prefill included), best of 2;
  * the bare decode step: 200 back-to-back `engine.step` calls timed with CUDA events (no host sync);
  * a profile of 20 steps: kernels per step, GPU kernel time per step, graph launches, top kernels;
  * greedy tokens against the eager model (equal prefix of 64).
PYTHONUNBUFFERED=1 python perf/decode_perf.py --variants base,fused,fused-attn,fused-attn-cdt
Results of its H100 run (before the model took up one_token_attention; "base" now includes it): perf/NOTES.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from tinyllama.config import ModelConfig
from tinyllama.generate import DecodeEngine, SamplingConfig, generate_batch, generate_batch_stream
from tinyllama.model import MLP, Attention, Llama, apply_rope

DEV = torch.device("cuda")
P, N = 128, 256


class FusedAttention(Attention):
    """q/k/v from one pre-concatenated weight; optional hand-written attention for one query token."""

    manual_decode_attention = False

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        B, T, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = F.linear(x, self.qkv_weight).split([nq, nkv, nkv], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if T == 1 and mask is not None and self.manual_decode_attention:
            G = self.n_heads // self.n_kv_heads
            qg = q.view(B, self.n_kv_heads, G, self.head_dim)
            s = torch.matmul(qg, k.transpose(-1, -2)).float() * self.head_dim ** -0.5  # (B, KV, G, S)
            s = s.masked_fill(~mask.view(mask.size(0), 1, 1, -1), float("-inf"))
            p = s.softmax(-1).to(v.dtype)
            y = torch.matmul(p, v).view(B, self.n_heads, 1, self.head_dim)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nq))


class FusedMLP(MLP):
    def forward(self, x):
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse(model: Llama, manual_attn: bool) -> Llama:
    for block in model.layers:
        a, m = block.self_attn, block.mlp
        a.qkv_weight = torch.nn.Parameter(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                                          requires_grad=False)
        del a.q_proj, a.k_proj, a.v_proj
        a.__class__ = FusedAttention
        a.manual_decode_attention = manual_attn
        m.gate_up_weight = torch.nn.Parameter(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                                              requires_grad=False)
        del m.gate_proj, m.up_proj
        m.__class__ = FusedMLP
    return model


def build() -> Llama:
    torch.manual_seed(0)
    with torch.device(DEV):
        model = Llama(ModelConfig.from_name("tinyllama-1.1b"))
        model.lm_head.weight.data.mul_(10.0)
    model = model.to(torch.bfloat16).eval()
    model.rope_cos.data, model.rope_sin.data = model.rope_cos.float(), model.rope_sin.float()
    return model


def gen_tps(model, engine, prompt, cfg, repeats=2):
    best, out = (float("inf"), 0.0), None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t_first, toks = None, []
        for step in generate_batch_stream(model, [prompt], cfg, engine=engine):
            t_first = t_first or time.perf_counter()
            toks.append(step[0])
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        if t < best[0]:
            best, out = (t, (N - 1) / (t0 + t - t_first)), toks
    return N / best[0], best[1], out


def step_ms(engine, model, n=200):
    engine.ensure_cache(1, P + N)
    ids = torch.tensor([[5]], device=DEV)
    slots = torch.arange(P + N, device=DEV)
    with torch.inference_mode():
        for i in range(10):
            engine.step(ids, slots[P + i:P + i + 1])
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(n):
            engine.step(ids, slots[P + (i % N):P + (i % N) + 1])
        e1.record()
        torch.cuda.synchronize()
        host0 = time.perf_counter()
        for i in range(20):
            engine.step(ids, slots[P + i:P + i + 1])
        host = (time.perf_counter() - host0) / 20 * 1e3  # CPU time to issue one step (GPU queue not full)
        torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n, host


def profile(engine, steps=20):
    from torch.profiler import ProfilerActivity, profile as prof

    ids = torch.tensor([[5]], device=DEV)
    slots = torch.arange(P + N, device=DEV)
    with torch.inference_mode(), prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for i in range(steps):
            engine.step(ids, slots[P + i:P + i + 1])
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    graph_launches = 0
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif "cudaGraphLaunch" in e.name:
            graph_launches += 1
    n_k = sum(v[0] for v in kernels.values()) / steps
    t_k = sum(v[1] for v in kernels.values()) / steps / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {"kernels_per_step": round(n_k, 1), "kernel_ms_per_step": round(t_k, 4), "graph_launches": graph_launches,
            "top": [(name[:90], c // steps, round(t / steps / 1e3, 4)) for name, (c, t) in top]}


def sweep_configs():
    """The GEMV block shapes to sweep: rows per program x columns per step x warps x pipeline stages."""
    from tinyllama.kernels.decode import GemvConfig

    out = []
    for bn in (1, 2, 4, 8, 16):
        for bk in (512, 1024, 2048):
            for warps in (4, 8):
                per_thread = bn * bk // (32 * warps)
                if not 16 <= per_thread <= 64:
                    continue
                for stages in (1, 3):
                    out.append(GemvConfig(bn, bk, warps, stages))
                out.append(GemvConfig(bn, bk, warps, 1, rowsum=True))
    return out


def gemv_table(base_model) -> dict:
    """Each product of the decode step over all 22 layers' matrices in turn, as the step reads them (so the
    small ones are not served from L2), timed as CUDA-graph replays: cuBLAS F.linear vs every swept Triton
    GEMV block shape; then the attention kernel (rotary + cache write + attention) vs the model's eager
    one-token attention. Prints µs per matrix and GB/s of weights read."""
    from tinyllama.kernels.decode import decode_attention, gemv, pdl_supported, time_candidates
    from tinyllama.model import one_token_attention

    pdl = pdl_supported(DEV)
    print(f"  sweep with programmatic dependent launch: {pdl}", flush=True)

    model = copy.deepcopy(base_model).fuse_projections()
    L, c = model.layers, model.config
    n1 = dict(norm_weight=L[0].input_layernorm.weight, eps=1e-5)
    shapes = {
        "qkv (+norm)": ([b.self_attn.qkv_proj.weight for b in L], n1, False),
        "o (+residual)": ([b.self_attn.o_proj.weight for b in L], {}, True),
        "gate_up (+norm, SwiGLU)": ([b.mlp.gate_up_proj.weight for b in L], dict(n1, swiglu=True), False),
        "down (+residual)": ([b.mlp.down_proj.weight for b in L], {}, True),
        "lm_head (+norm)": ([model.lm_head.weight] * 3, n1, False),  # 131 MB: L2 cannot hold it between calls
    }
    configs = sweep_configs()
    rows = {}
    with torch.inference_mode():
        for name, (ws, kw, res) in shapes.items():
            K = ws[0].size(1)
            n_out = ws[0].size(0) // 2 if kw.get("swiglu") else ws[0].size(0)
            x = torch.randn(K, device=DEV, dtype=torch.bfloat16)
            out = torch.zeros(n_out, device=DEV, dtype=torch.bfloat16)
            per = ws[0].numel() * ws[0].element_size()
            kw2 = dict(kw, residual=out) if res else kw
            cublas = time_candidates(lambda _: [F.linear(x[None], w) for w in ws], ["cublas"])["cublas"] / len(ws)
            t = time_candidates(lambda cfg: [gemv(x, w, out, config=cfg, pdl=pdl, **kw2) for w in ws], configs)
            ranked = sorted(t.items(), key=lambda kv: kv[1])
            row = {"MB_per_matrix": round(per / 1e6, 2), "cublas_us": round(cublas, 2),
                   "cublas_GBps": round(per / cublas / 1e3, 1),
                   "triton": [(f"{k.block_n}x{k.block_k} w{k.num_warps} s{k.num_stages}{' rowsum' if k.rowsum else ''}",
                               round(v / len(ws), 2),
                               round(per / (v / len(ws)) / 1e3, 1)) for k, v in ranked]}
            rows[name] = row
            print(f"  gemv {name}: {row['MB_per_matrix']} MB/matrix; cuBLAS {row['cublas_us']} us "
                  f"({row['cublas_GBps']} GB/s); Triton top 6 (cfg, us, GB/s): {row['triton'][:6]}; "
                  f"worst {row['triton'][-1]}", flush=True)
        S = 512
        caches = [(torch.randn(1, c.n_kv_heads, S, c.head_dim, device=DEV, dtype=torch.bfloat16),
                   torch.randn(1, c.n_kv_heads, S, c.head_dim, device=DEV, dtype=torch.bfloat16)) for _ in L]
        qkv = torch.randn((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, device=DEV, dtype=torch.bfloat16)
        out = torch.empty(c.n_heads * c.head_dim, device=DEV, dtype=torch.bfloat16)
        q = torch.randn(1, c.n_heads, 1, c.head_dim, device=DEV, dtype=torch.bfloat16)
        for pos in (128, 383):
            pos_t = torch.tensor([pos], device=DEV)
            cands = [(bs, w) for bs in (64, 128, 256) for w in (4, 8)]
            t = time_candidates(lambda cw: [decode_attention(qkv, k, v, pos_t, model.rope_cos, model.rope_sin, out,
                                                             c.n_heads, c.n_kv_heads, block_s=cw[0], num_warps=cw[1],
                                                             pdl=pdl)
                                            for k, v in caches], cands)
            mask = (torch.arange(S, device=DEV) <= pos).view(1, 1, 1, S)
            eager = time_candidates(lambda _: [one_token_attention(q, k, v, mask) for k, v in caches], ["e"])["e"]
            ranked = sorted(((f"block_s {k[0]} w{k[1]}", round(v / len(L), 2)) for k, v in t.items()), key=lambda r: r[1])
            rows[f"attention pos {pos}"] = {"triton_us": ranked, "eager_one_token_attention_us": round(eager / len(L), 2)}
            print(f"  attention at pos {pos}: Triton (cfg, us) {ranked}; eager one_token_attention (no rotary, no "
                  f"cache write) {eager / len(L):.2f} us", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base,fused,fused-attn,fused-attn-cdt")
    ap.add_argument("--gemv", action="store_true", help="first time each product and the attention kernel alone")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", ".")
    torch._logging.set_logs(perf_hints=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    base_model = build()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 32000, (P,), generator=gen).tolist()
    cfg = SamplingConfig(max_new_tokens=N, stop_at_eos=False)
    ref = generate_batch(base_model, [prompt], cfg.replace(max_new_tokens=64))[0]
    results = {}
    if args.gemv:
        results["gemv"] = gemv_table(base_model)
        with open(os.path.join(out_dir, "decode_perf.json"), "w") as f:
            json.dump(results, f, indent=1)
    for name in args.variants.split(","):
        torch._dynamo.reset()
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = "cdt" in name
        t0 = time.perf_counter()
        if name.startswith("engine"):  # the product path: DecodeEngine(fuse=True), optionally max-autotune
            model = copy.deepcopy(base_model)
            kernels = "torch" if "torch" in name else "triton" if "triton" in name else "auto"
            engine = DecodeEngine(model, compile=True, fuse=True, decode_kernels=kernels,
                                  compile_mode="max-autotune" if name.endswith("mat") else "reduce-overhead",
                                  prefill_graphs="noprefillgraph" not in name)
            if "nopdl" in name:
                engine.triton_step(1).pdl = False
        else:
            model = base_model if name == "base" else fuse(copy.deepcopy(base_model), manual_attn="attn" in name)
            engine = DecodeEngine(model, compile=True)
        generate_batch(model, [prompt], cfg.replace(max_new_tokens=8), engine=engine)
        generate_batch(model, [prompt], cfg.replace(max_new_tokens=8), engine=engine)
        warm = time.perf_counter() - t0
        tps, dec, toks = gen_tps(model, engine, prompt, cfg)
        match = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref)))
        sms, host_ms = step_ms(engine, model)
        pr = profile(engine)
        # prefill alone (eager)
        ids = torch.tensor([prompt], device=DEV)
        with torch.inference_mode():
            for _ in range(3):
                engine.prefill(ids)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(5):
                engine.prefill(ids)
            torch.cuda.synchronize()
        pre_ms = (time.perf_counter() - t1) / 5 * 1e3
        r = {"tokens_per_s": round(tps, 1), "decode_tokens_per_s": round(dec, 1), "step_ms": round(sms, 4),
             "host_issue_ms": round(host_ms, 4), "prefill_ms": round(pre_ms, 2), "compile_s": round(warm, 1),
             "greedy_prefix_vs_eager": match, **pr}
        results[name] = r
        print(f"== {name}: {json.dumps(r, indent=1)}", flush=True)
        engine.release()
        if model is not base_model:
            del model
        torch.cuda.empty_cache()
        with open(os.path.join(out_dir, "decode_perf.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n| variant | tokens/s | decode tok/s | step ms (GPU) | host ms/step | kernels/step | kernel ms/step | graph launches/20 | prefill ms | prefix=eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if name == "gemv":
            continue
        print(f"| {name} | {r['tokens_per_s']} | {r['decode_tokens_per_s']} | {r['step_ms']} | {r['host_issue_ms']} | "
              f"{r['kernels_per_step']} | {r['kernel_ms_per_step']} | {r['graph_launches']} | {r['prefill_ms']} | "
              f"{r['greedy_prefix_vs_eager']} |")


if __name__ == "__main__":
    main()
