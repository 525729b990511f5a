"""`tinyllama bench generate`: decode speed of ours (eager and CUDA-graph) vs transformers `generate`.

Random weights of a preset (speed does not depend on weight values) or a model directory. Batch 1 with
a fixed prompt length and number of new tokens, then batch-N throughput, then weight-only quantized
variants. Greedy outputs of ours and transformers are compared on the same weights (bf16 drifts after a
while on random weights; the matching prefix length is printed). Results are printed as a table and, with
--json, written to a file after every measurement, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch

from tinyllama.checks import POSITIVE_INT
from tinyllama.cli import _args as flag
from tinyllama.hub import check_model_dir


def add_arguments(p) -> None:
    p.add_argument("--preset", default="tinyllama-1.1b", help="random-weight preset (default tinyllama-1.1b)")
    p.add_argument("--model", default=None, help="a Hugging Face model directory instead of --preset")
    p.add_argument("--device", type=flag.device, default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", type=flag.dtype, default=None, help="bfloat16 / float32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--prompt-len", type=flag.positive_int, default=128)
    p.add_argument("--new-tokens", type=flag.positive_int, default=256)
    p.add_argument("--batch-sizes", type=flag.number_list(**POSITIVE_INT), default="1,8,32", help="comma list; batch 1 is always measured")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled / CUDA-graph runs")
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="run the compiled prefill without capturing it in a CUDA graph per prompt shape")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--triton-max-batch", type=flag.nonnegative_int, default=None,
                   help="largest batch the Triton decode step runs (default: DecodeEngine's auto limit); "
                        "the torch step is timed beside it at every batch up to this")
    p.add_argument("--no-torch-step", action="store_true",
                   help="do not time the torch.compile'd step beside the Triton step (saves its compile: ~1 min "
                        "a batch size on a fresh machine)")
    p.add_argument("--triton-deferred", choices=("off", "auto", "on"), default="auto",
                   help="the Triton step's deferred split-K sums at 2+ rows: auto times both steps and keeps the faster")
    p.add_argument("--reuse-tuning", action="store_true",
                   help="take the Triton step's tuned tiles kept on disk by an earlier run (TINYLLAMA_TUNING_CACHE) "
                        "instead of timing every candidate afresh (the default here, so each candidate's time is reported)")
    p.add_argument("--quant", default="", help="comma list of int8,int4-32,int4-128 to time at batch 1")
    p.add_argument("--repeats", type=flag.positive_int, default=2, help="timed repeats per variant (best is kept)")
    p.add_argument("--time-budget", type=flag.nonnegative_float, default=0,
                   help="seconds; variants that would start after this are skipped (0 = no limit)")
    p.add_argument("--draft", default=None,
                   help="a draft model directory (or preset) for speculative decoding: times target alone vs drafted")
    p.add_argument("--draft-k", type=flag.number_list(**POSITIVE_INT), default="2,4", help="comma list of draft tokens per round to time with --draft")
    p.add_argument("--threads", type=flag.positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", default=None, help="write results to this JSON file")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, device, dtype):
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama

    if args.model:
        return Llama.from_pretrained(check_model_dir(args.model), dtype=dtype, device=device).eval()
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(ModelConfig.from_name(args.preset))
        # Random init gives near-flat logits, where greedy picks are coin flips between near-ties in bf16;
        # a sharper output head makes the greedy cross-checks meaningful (speed is unaffected).
        model.lm_head.weight.data.mul_(10.0)
    model = model.to(dtype).eval()
    model.rope_cos.data, model.rope_sin.data = model.rope_cos.float(), model.rope_sin.float()
    return model


def build_hf(model, device, dtype):
    import transformers

    from tinyllama.convert.hf import to_hf_state_dict

    conf = transformers.LlamaConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                                       if k not in ("architectures", "torch_dtype", "model_type")})
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(conf, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


def run(args) -> int:
    from tinyllama.loading import inference_device_and_dtype
    from tinyllama.generate import DecodeEngine, SamplingConfig, generate_batch, generate_batch_stream
    from tinyllama.quantize import quantize_model, weight_bytes

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = inference_device_and_dtype(args.device, args.dtype)
    if device.type == "cuda":
        from tinyllama.kernels.decode import TUNING_STORE

        TUNING_STORE.read = args.reuse_tuning  # written either way: the next serve start finds this run's choices
    model = build_model(args, device, dtype)
    cfg_m = model.config
    P, N = args.prompt_len, args.new_tokens
    if P + N > cfg_m.max_seq_len:
        from tinyllama.errors import TinyLlamaError

        raise TinyLlamaError(f"--prompt-len + --new-tokens = {P + N} exceeds the model's context {cfg_m.max_seq_len}")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": card,
        "torch": torch.__version__, "model": args.model or args.preset, "dtype": str(dtype).replace("torch.", ""),
        "params": model.num_params(), "prompt_len": P, "new_tokens": N, "rows": [], "checks": {},
    }
    gen = torch.Generator().manual_seed(1)
    prompts_all = torch.randint(3, cfg_m.vocab_size, (64, P), generator=gen).tolist()
    greedy = SamplingConfig(max_new_tokens=N, stop_at_eos=False)

    def save():
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
            os.replace(tmp, args.json)

    def over_budget(name) -> bool:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"  {name}: skipped (time budget of {args.time_budget:.0f}s spent)", flush=True)
            result["rows"].append({"name": name, "skipped": "time budget"})
            save()
            return True
        return False

    def timed(fn, repeats=None):
        best, out = float("inf"), None
        for _ in range(max(1, repeats or args.repeats)):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best, out

    def timed_stream(prompts, engine, m=None):
        """(total seconds, decode-only tokens/s per row after the first token, outputs); best of repeats."""
        m = m or model
        best = (float("inf"), 0.0, None)
        for _ in range(max(1, args.repeats)):
            outs = [[] for _ in prompts]
            _sync(device)
            t0 = time.perf_counter()
            t_first = None
            for step in generate_batch_stream(m, prompts, greedy, engine=engine):
                if t_first is None:
                    t_first = time.perf_counter()
                for r, tok in enumerate(step):
                    if tok is not None:
                        outs[r].append(tok)
            _sync(device)
            t = time.perf_counter() - t0
            if t < best[0]:
                best = (t, (N - 1) / (t0 + t - t_first), outs)
        return best

    def record(name, batch, seconds, extra=None):
        row = {"name": name, "batch": batch, "seconds": round(seconds, 4),
               "tokens_per_s": round(batch * N / seconds, 1), **(extra or {})}
        result["rows"].append(row)
        dec = f", decode only {row['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in row else ""
        print(f"  {name:<34} batch {batch:>3}: {row['tokens_per_s']:>9.1f} tokens/s  ({seconds:.3f} s for {N} new "
              f"tokens/row, prefill included{dec})", flush=True)
        if "step_kernels" in row:
            print(f"    decode step: {row['step_kernels']}; whole-step µs when tuned: {row.get('step_us_tuned', '-')}; "
                  f"replayed alone {row.get('step_graph_us', '-')} µs, the generate loop adds "
                  f"{row.get('loop_us_per_step', '-')} µs a step", flush=True)
            print(f"    attention (splits x block, +l2: cache prefetched into L2): {row['attention']}; µs over all "
                  f"layers when tuned (mean of the first step's position and {row.get('attention_tuned_until')}): "
                  f"{row.get('attention_us_tuned', '-')}", flush=True)
        save()
        return row

    wb = weight_bytes(model)
    print(f"bench generate: {result['model']} ({result['params'] / 1e6:.0f} M params, {wb / 1e9:.2f} GB weights, "
          f"{result['dtype']}) on {card}; prompt {P}, {N} new tokens, greedy", flush=True)
    one = prompts_all[:1]

    # 1. ours, eager
    eager = DecodeEngine(model, compile=False)
    eager.ensure_cache(1, P + N)
    generate_batch(model, one, greedy.replace(max_new_tokens=4), engine=eager)  # warm-up
    t, dec, ours_eager = timed_stream(one, eager)
    record("ours eager", 1, t, {"decode_tokens_per_s": round(dec, 1)})
    eager.release()

    compiled = fast = None
    if device.type == "cuda" and not args.no_compile:
        # A fused copy (q/k/v and gate/up as one matrix each): the original stays for the baselines.
        fast = copy.deepcopy(model)
        compiled = DecodeEngine(fast, compile=True, fuse=True, prefill_graphs=not args.no_prefill_graphs,
                                triton_max_batch=args.triton_max_batch,
                                triton_deferred={"off": False, "auto": None, "on": True}[args.triton_deferred])

    def compiled_batch(B, kernels="auto"):
        # kernels="auto": the Triton decode step where it can (tinyllama.kernels.decode);
        # "torch": the torch.compile'd step, for comparison in the same run.
        engine = compiled if kernels == "auto" else DecodeEngine(fast, compile=True, decode_kernels=kernels,
                                                                 prefill_graphs=not args.no_prefill_graphs)
        name = "ours compiled + CUDA graph"
        if B <= engine.triton_max_batch:
            name = "ours Triton decode step + CUDA graph"
        prompts = prompts_all[:B]
        engine.ensure_cache(B, P + N)
        t0 = time.perf_counter()
        # compile + capture; the whole length, as the Triton step's first call tunes its attention for the
        # positions that generation will reach (`last_pos`: a short warm-up would tune for positions 128-134)
        generate_batch(fast, prompts, greedy, engine=engine)
        generate_batch(fast, prompts, greedy.replace(max_new_tokens=8), engine=engine)
        warm = time.perf_counter() - t0
        t, dec, out = timed_stream(prompts, engine, fast)
        extra = {"compile_s": round(warm, 1), "decode_tokens_per_s": round(dec * B, 1)}
        ids = torch.tensor(prompts, device=device)
        with torch.inference_mode():
            pre, _ = timed(lambda: engine.prefill(ids), repeats=5)
        extra["prefill_ms"] = round(pre * 1e3, 2)
        step = engine.triton_step(B)
        if step is not None:  # which kernels ran the step, and the whole-step times its tuning measured
            extra["step_kernels"] = step.kernels
            extra["step_tiles"] = step.tiles
            # the step alone, replayed back to back: the decode-only rate's time per step minus this is what
            # the generate loop adds (host work, the per-token sync)
            replay = step.replay_us()
            if replay is not None:
                extra["step_graph_us"] = round(replay, 1)
                extra["loop_us_per_step"] = round(B * 1e6 / extra["decode_tokens_per_s"] - replay, 1)
            if args.reuse_tuning:  # the tiles and times below are an earlier run's when kept on disk
                extra["tuning"] = "timed in this run" if step.tile_times else "kept from an earlier run"
            if step.step_times:
                extra["step_us_tuned"] = step.step_times
            # the attention (`AttentionConfig.name`) and, when tuned, each candidate's µs over all layers: the
            # mean of its times at the first step's position and at the generation's last (`tune_until`)
            extra["attention"] = step.attention_config.name
            extra["attention_tuned_until"] = step.tune_until
            if step.l2_times:  # each product's tuned tile with its weights prefetched into L2 that far ahead (K-blocks)
                extra["l2_ahead_us_tuned"] = {name: {str(a): round(t, 1) for a, t in times.items()}
                                              for name, times in step.l2_times.items()}
            if step.tile_times:  # every tile each product timed (µs over all layers), fastest first
                extra["tiles_us_tuned"] = {
                    name: {str(cfg): round(t, 1) for cfg, t in sorted(times.items(), key=lambda kv: kv[1])}
                    for name, times in step.tile_times.items()}
            if step.attention_times:
                extra["attention_us_tuned"] = {cfg.name: round(t, 1) for cfg, t in step.attention_times.items()}
            if step.attention_step_times:  # the closest of those again, each in the whole step (µs a step)
                extra["attention_step_us_tuned"] = {cfg.name: t for cfg, t in step.attention_step_times.items()}
        if B == 1:
            match = next((i for i, (a, b) in enumerate(zip(out[0], ours_eager[0])) if a != b), len(out[0]))
            extra["greedy_prefix_equal_to_eager"] = match
            result["checks"]["compiled_vs_eager_prefix" if kernels == "auto" else f"{kernels}_step_vs_eager_prefix"] = match
            extra["decode_weight_GBps"] = round(wb * dec / 1e9, 1)
        record(name, B, t, extra)
        if engine is not compiled:
            engine.release()

    def padded_check():
        # a left-padded batch under the CUDA graph gives the rows' single-prompt outputs
        lens = [P, P // 2, 7, P - 1]
        mixed = [prompts_all[i][:n] for i, n in enumerate(lens)]
        short = greedy.replace(max_new_tokens=32)
        compiled.ensure_cache(len(mixed), P + N)
        batch_out = generate_batch(fast, mixed, short, engine=compiled)
        compiled.ensure_cache(1, P + N)
        single = [generate_batch(fast, [m], short, engine=compiled)[0] for m in mixed]
        prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(batch_out, single)]
        result["checks"]["padded_batch_vs_single_prefix"] = prefix
        print(f"  check: padded batch (lengths {lens}) vs one-by-one, equal greedy prefix per row: {prefix} of 32",
              flush=True)
        save()

    hf_models: dict = {}

    def hf_baseline(cache=None, compile_forward=False):
        """transformers `generate`, batch 1: dynamic cache (eager); static cache, uncompiled; static cache with
        the forward compiled the way transformers does it itself. On CUDA, `generate` with a static cache
        compiles the decoding forward on its own (`CompileConfig`: reduce-overhead, i.e. CUDA graphs) unless
        `disable_compile`; so the uncompiled row passes it, and the compiled row lets transformers compile
        (wrapping its forward in a torch.compile of our own compiled it twice and crashed: "accessing tensor
        output of CUDAGraphs that has been overwritten")."""
        import transformers

        hf = hf_models.get("hf") or hf_models.setdefault("hf", build_hf(model, device, dtype))
        ids = torch.tensor(one, device=device)
        # (transformers before ~4.50 has no disable_compile and compiles no static cache on its own)
        can_disable = hasattr(transformers.GenerationConfig(), "disable_compile")
        compile_kw = {"disable_compile": True} if cache == "static" and not compile_forward and can_disable else {}
        if compile_forward and not can_disable:
            raise RuntimeError(f"transformers {transformers.__version__} does not compile generate's forward "
                               "itself (4.50+ does)")

        def hf_run(n=N):
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation=cache,
                                   **compile_kw)

        t0 = time.perf_counter()
        hf_run(4)  # warm-up
        if compile_forward:
            hf_run(16)
        warm = time.perf_counter() - t0
        t, out = timed(hf_run, repeats=1 if cache is None else args.repeats)
        theirs = out[0, P:].tolist()
        match = next((i for i, (a, b) in enumerate(zip(theirs, ours_eager[0])) if a != b), len(theirs))
        label = {None: "eager", "static": "static cache"}[cache] + (" + torch.compile" if compile_forward else "")
        result["checks"][f"transformers_{label.replace(' ', '_')}_vs_ours_greedy_prefix"] = match
        record(f"transformers {transformers.__version__} generate ({label})", 1, t,
               {"greedy_prefix_equal_to_ours": match, "warmup_s": round(warm, 1),
                **({"compiled_by": "transformers (CompileConfig defaults)"} if compile_forward else {})})
        print(f"  check: transformers ({label}) greedy equals ours for the first {match} of {N} tokens", flush=True)

    def attempt(name, fn, *a):
        if over_budget(name):
            return
        try:
            fn(*a)
        except Exception as e:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            result["rows"].append({"name": name, "error": f"{type(e).__name__}: {e}"[:500]})
            save()

    batches = [b for b in args.batch_sizes if b != 1]
    if compiled is not None:
        if compiled.triton_max_batch and not args.no_torch_step:
            attempt("ours compiled b1 (torch step)", compiled_batch, 1, "torch")
        attempt("ours compiled b1", compiled_batch, 1)
    if not args.no_hf:
        attempt("transformers generate", hf_baseline)
        attempt("transformers generate (static cache)", hf_baseline, "static")
        if device.type == "cuda":
            attempt("transformers generate (static cache + compile)", hf_baseline, "static", True)
        hf_models.clear()
    if compiled is not None:
        for B in batches:
            if B <= compiled.triton_max_batch and not args.no_torch_step:
                attempt(f"ours compiled b{B} (torch step)", compiled_batch, B, "torch")
            attempt(f"ours compiled b{B}", compiled_batch, B)
        attempt("padded batch check", padded_check)
        compiled.release()
        compiled = fast = None  # frees the fused copy (2.2 GB for 1.1B in bf16)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 4. eager batches on CPU (no graphs there)
    if device.type != "cuda":
        def eager_batch(B):
            eng = DecodeEngine(model)
            t, _ = timed(lambda: generate_batch(model, prompts_all[:B], greedy, engine=eng))
            record("ours eager", B, t)
            eng.release()

        for B in batches:
            attempt(f"ours eager b{B}", eager_batch, B)

    # 5. weight-only quantized, batch 1
    def quant_run(spec):
        scheme, _, group = spec.partition("-")
        qmodel = quantize_model(copy.deepcopy(model).fuse_projections(), scheme, int(group or 128))
        kernels = sorted({str(getattr(m, "kernel", getattr(m, "use_kernel", None))) for m in qmodel.modules()
                          if hasattr(m, "kernel") or hasattr(m, "use_kernel")})
        use_compile = device.type == "cuda" and not args.no_compile
        eng = DecodeEngine(qmodel, compile=use_compile)
        eng.ensure_cache(1, P + N)
        t0 = time.perf_counter()
        generate_batch(qmodel, one, greedy.replace(max_new_tokens=8), engine=eng)
        generate_batch(qmodel, one, greedy.replace(max_new_tokens=8), engine=eng)
        warm = time.perf_counter() - t0
        t, dec, out = timed_stream(one, eng, qmodel)
        match = next((i for i, (a, b) in enumerate(zip(out[0], ours_eager[0])) if a != b), len(out[0]))
        record(f"ours {spec}{' compiled' if use_compile else ' eager'}", 1, t,
               {"decode_tokens_per_s": round(dec, 1), "weight_GB": round(weight_bytes(qmodel) / 1e9, 3), "kernel": kernels, "compile_s": round(warm, 1),
                "greedy_prefix_equal_to_bf16": match})
        eng.release()

    for spec in [s.strip() for s in args.quant.split(",") if s.strip()]:
        attempt(f"quant {spec}", quant_run, spec)

    # 6. speculative decoding with a draft model, batch 1 (eager)
    def speculative_run():
        from tinyllama.config import PRESETS
        from tinyllama.model import Llama
        from tinyllama.speculative import speculative_generate

        if args.draft in PRESETS:
            torch.manual_seed(1)
            with torch.device(device):
                draft = Llama(PRESETS[args.draft])
            draft = draft.to(dtype).eval()
        else:
            draft = Llama.from_pretrained(check_model_dir(args.draft, "--draft"), dtype=dtype, device=device).eval()
        base = None
        for k in args.draft_k:
            t, (out, stats) = timed(lambda: speculative_generate(model, draft, one[0], greedy, k=k))
            if base is None:
                eng = DecodeEngine(model)
                base, _ = timed(lambda: generate_batch(model, one, greedy, engine=eng))
                eng.release()
            record(f"speculative k={k} (draft {args.draft})", 1, t,
                   {"acceptance_rate": round(stats.acceptance_rate, 3), "tokens_per_round": round(stats.tokens_per_round, 2),
                    "speedup_vs_target_eager": round(base / t, 2), "same_as_target_greedy": out == ours_eager[0]})
            print(f"    acceptance {stats.acceptance_rate:.1%}, {stats.tokens_per_round:.2f} tokens per target pass, "
                  f"speed-up {base / t:.2f}x over the target alone (eager)", flush=True)

    if args.draft:
        attempt("speculative", speculative_run)

    result["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(f"done in {result['total_s']} s", flush=True)
    return 0
