"""Python host work per serve-engine step: the model's decode step replaced by a constant (B, 512) tensor, so
what is timed is the engine's own bookkeeping, sampling calls and emitting (16 rows, 64 tokens, best of 3).

PYTHONPATH=src python perf/serve_host_overhead.py"""
import time, torch
from tinyllama.config import ModelConfig
from tinyllama.model import Llama
from tinyllama.generate import SamplingConfig
from tinyllama.serve.engine import Engine, Sequence
torch.set_num_threads(1); torch.manual_seed(0)
model = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512)).eval()
modes = {"greedy": lambda i: SamplingConfig(max_new_tokens=64, stop_at_eos=False),
         "seeded": lambda i: SamplingConfig(max_new_tokens=64, temperature=0.8, seed=i, stop_at_eos=False)}
for name, cfg in modes.items():
    for ov in (False, True):
        e = Engine(model, max_batch_size=16, max_seq_len=256, overlap=ov)
        fake = torch.randn(16, 512)
        e.decoder.step = lambda ids, *a, **k: fake[: ids.size(0)]
        best = 1e9
        for _ in range(3):
            done = [False] * 16
            for i in range(16):
                e.submit(Sequence(list(range(3, 20 + i)), cfg(i), lambda t: None, lambda r, er, i=i: done.__setitem__(i, True)))
            e.step(); s0 = e.stats.decode_steps; t0 = time.perf_counter()
            while not all(done): e.step()
            best = min(best, (time.perf_counter() - t0) / (e.stats.decode_steps - s0))
        print(f"{name:7s} overlap={ov!s:5s} host per step {best*1e6:6.0f} us")
