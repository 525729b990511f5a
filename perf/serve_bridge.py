"""The server's host cost per token, without a model: `tinyllama serve`'s app and engine over a decode step
stubbed to sleep --step-ms (what a GPU step costs the host thread: it waits without the GIL) and return constant
logits, loaded by `bench serve`'s openai clients from another process. What is left is HTTP, the engine's
bookkeeping and its (greedy) sampling calls, the engine-thread -> event-loop hand-over of every token, and
the GIL between them. Compare tokens/s and the wall time per decode step against --step-ms.

PYTHONPATH=src python perf/serve_bridge.py [--step-ms 1.3] [--requests 200] [--clients 16] [--max-tokens 64]"""
import argparse
import subprocess
import sys
import time


def serve(port: int, step_ms: float, batch: int) -> None:
    import torch
    import uvicorn

    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama
    from tinyllama.serve.app import create_app
    from tinyllama.serve.engine import Engine
    from tinyllama.tokenizer import Tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tinyllama-tiny")).eval()  # never run: its steps are the stubs
    # as compiled on a GPU: short prompts ride in the decode steps (the stub is synchronous: no overlap to win)
    engine = Engine(model, max_batch_size=batch, max_seq_len=256, prefill_in_decode=32, overlap=False)
    fake = torch.randn(batch, 512)  # narrow: picking from it costs the host what a GPU launch does, not a CPU argmax

    def stub(ids, *a, **k):  # a decode step or a prefill pass
        time.sleep(step_ms / 1e3)
        return fake[: ids.size(0)]

    engine.decoder.step = engine.decoder.prefill = stub
    app = create_app(engine, Tokenizer(), "bench", 1 << 20)
    engine.start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--step-ms", type=float, default=1.3)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve, args.step_ms, args.clients)
    from tinyllama.bench.serve import _free_port, measure_load, wait_until_up

    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--step-ms", str(args.step_ms),
                             "--clients", str(args.clients)])
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_until_up(url, proc)
        if problem:
            sys.exit(problem)
        r = measure_load(url, args.requests, args.clients, args.max_tokens, 0.0)
        print(f"{r['tokens_per_s']:8.1f} tok/s  {r['engine_time']['wall_ms_per_step']:5.2f} ms per decode step "
              f"(stub {args.step_ms} ms)  mean batch {r['mean_seqs_per_decode_step']:5.2f}  p50 {r['p50_s']:.3f} s  "
              f"failures {r['failures']}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
