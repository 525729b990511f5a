"""The CPU training process keeps freed host memory mapped (train/host_allocator.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tinyllama.train.host_allocator import keep_freed_host_memory, user_allocator_choice

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the knobs are glibc malloc's")

# Allocate, write and free a 64 MB tensor 20 times, as a CPU training step does with its activations;
# print the minor page faults that took.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from tinyllama.train.distributed import init_distributed
        assert init_distributed("cpu").device.type == "cpu"
    torch.empty(16 * 2**20).fill_(1.0)  # warm up torch's own first-use allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(16 * 2**20).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@glibc
def test_cpu_training_process_stops_refaulting_its_freed_memory():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=_clean_env(), capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    # 20 × 64 MB is 327,680 pages of 4 KB: the system allocator faults each in again (unmapped on free)
    system, kept = faults("system"), faults("keep")
    assert system > 20 * 16384 * 0.9, system
    assert kept < system / 10, (kept, system)


@pytest.mark.parametrize("env, chosen", [
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1", "LD_PRELOAD": "libfoo.so"}, None),
])
def test_a_users_own_allocator_choice_is_left_alone(env, chosen):
    assert user_allocator_choice(env) == chosen
    if chosen is not None:
        assert keep_freed_host_memory(env) == f"user chose via {chosen}"
