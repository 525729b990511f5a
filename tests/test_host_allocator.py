"""Model work on the CPU keeps freed host memory mapped (host_allocator.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tinyllama.host_allocator import MIN_GLIBC, glibc_version, user_allocator_choice

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the knobs are glibc malloc's")

old_glibc = pytest.mark.skipif(glibc_version() is not None and glibc_version() < MIN_GLIBC,
                               reason="glibc < 2.35 refuses the mmap threshold (the run says so instead)")

# Allocate, write and free a 64 MB tensor 20 times, as a CPU training step does with its activations;
# print the minor page faults that took, in pages of 4 KB. Transparent huge pages off for this process
# (PR_SET_THP_DISABLE), as with THP "always" 2 MB pages would hide the re-faulting from the count.
FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
    import torch
    if sys.argv[1] == "train":  # a pretraining or fine-tuning process on the CPU
        from tinyllama.train.distributed import init_distributed
        assert init_distributed("cpu").device.type == "cpu"
    elif sys.argv[1] == "eval":  # tinyllama eval on the CPU (no task: loads the model and returns)
        from tinyllama.eval.run import EvalConfig, evaluate
        evaluate(EvalConfig(random_preset="tinyllama-demo", device="cpu"))
    elif sys.argv[1] == "generate":  # other commands load models too, and keep the system's allocator
        from tinyllama.loading import load_model_and_tokenizer
        load_model_and_tokenizer(None, "tinyllama-demo", "cpu")
    torch.empty(16 * 2**20).fill_(1.0)  # warm up torch's own first-use allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(16 * 2**20).fill_(1.0)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() // 4096)
""")
REFAULTED = 20 * 16384 * 0.9  # 20 × 64 MB is 327,680 pages of 4 KB: the system allocator faults each in again


def _faults(mode, **env):
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("MALLOC_", "TINYLLAMA_SYSTEM_MALLOC", "THP_MEM_ALLOC"))
              and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}, "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc
@old_glibc
def test_cpu_training_and_eval_stop_refaulting_their_freed_memory():
    system, training, evaluating = _faults("system"), _faults("train"), _faults("eval")
    assert system > REFAULTED, system
    assert training < system / 10, (training, system)
    assert evaluating < system / 10, (evaluating, system)
    assert _faults("generate") > REFAULTED  # not applied where the model may run in another thread (serve)


@glibc
@old_glibc
def test_the_opt_out_keeps_the_system_behaviour():
    assert _faults("train", TINYLLAMA_SYSTEM_MALLOC="1") > REFAULTED


@pytest.mark.parametrize("env, chosen", [
    ({"TINYLLAMA_SYSTEM_MALLOC": "1"}, "TINYLLAMA_SYSTEM_MALLOC"),
    ({"TINYLLAMA_SYSTEM_MALLOC": "0"}, None),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_ARENA_MAX": "2"}, None),  # set globally in many images; it does not touch these settings
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, None),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1", "LD_PRELOAD": "libfoo.so"}, None),
])
def test_which_environment_variables_count_as_the_users_allocator_choice(env, chosen):
    assert user_allocator_choice(env) == chosen


def test_an_old_glibc_is_left_alone_and_the_cpu_run_says_so(monkeypatch, capsys):
    from tinyllama import host_allocator
    from tinyllama.train.distributed import init_distributed

    calls = []
    monkeypatch.setattr(host_allocator, "_applied", None)
    monkeypatch.setattr(host_allocator, "glibc_version", lambda: (2, 34))
    monkeypatch.setattr(host_allocator.ctypes, "CDLL", lambda *a: calls.append(a))  # mallopt must not be reached
    for name in host_allocator.USER_ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    init_distributed("cpu")
    assert host_allocator.keep_freed_host_memory() == "glibc 2.34 < 2.35" and not calls
    assert "host allocator is glibc's default (glibc 2.34 < 2.35)" in capsys.readouterr().err
