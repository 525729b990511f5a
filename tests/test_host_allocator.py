"""Model work on the CPU keeps freed host memory mapped (host_allocator.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tinyllama.host_allocator import user_allocator_choice

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the knobs are glibc malloc's")

# Allocate, write and free a 64 MB tensor 20 times, as a CPU training step does with its activations;
# print the minor page faults that took.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "train":  # a training process on the CPU
        from tinyllama.train.distributed import init_distributed
        assert init_distributed("cpu").device.type == "cpu"
    elif sys.argv[1] == "load":  # eval, generate, chat, serve on the CPU
        from tinyllama.loading import load_model_and_tokenizer
        load_model_and_tokenizer(None, "tinyllama-demo", "cpu")
    torch.empty(16 * 2**20).fill_(1.0)  # warm up torch's own first-use allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(16 * 2**20).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode, **env):
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}, "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc
def test_cpu_training_and_inference_stop_refaulting_their_freed_memory():
    # 20 × 64 MB is 327,680 pages of 4 KB: the system allocator faults each in again (unmapped on free)
    system, training, loaded = _faults("system"), _faults("train"), _faults("load")
    assert system > 20 * 16384 * 0.9, system
    assert training < system / 10, (training, system)
    assert loaded < system / 10, (loaded, system)


@glibc
def test_a_user_who_set_a_malloc_variable_keeps_the_system_behaviour():
    # MALLOC_ARENA_MAX does not change the mmap threshold: the faults stay those of the system allocator
    assert _faults("train", MALLOC_ARENA_MAX="4") > 20 * 16384 * 0.9


@pytest.mark.parametrize("env, chosen", [
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1", "LD_PRELOAD": "libfoo.so"}, None),
])
def test_which_environment_variables_count_as_the_users_allocator_choice(env, chosen):
    assert user_allocator_choice(env) == chosen
