"""The Triton multi-tensor AdamW step (tinyllama.kernels.adamw) against torch's AdamW, and its wiring.

The kernel tests run on CUDA, or on the CPU under Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, as tests/test_kernels_decode.py does).
"""

import copy
import importlib.util
import os
import re

import pytest
import torch
from conftest import run_pytest_interpreted

from tinyllama.errors import TinyLlamaError
from tinyllama.train.optim import OptimConfig, build_optimizer

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUNS = HAS_TRITON and (torch.cuda.is_available() or INTERPRETED)
needs_triton = pytest.mark.skipif(not RUNS, reason="needs Triton on CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
# not multiples of the blocks, one element, more than one default chunk (32 K) and more than one small one
SHAPES = [(37,), (1,), (5, 300), (33000,), (2, 1030)]
SMALL = dict(chunk_size=256, block_size=64)  # many chunks and tails on small tensors


def _twins(n: int, shapes=SHAPES, dtype=torch.float32):
    torch.manual_seed(0)
    base = [torch.randn(s, device=DEVICE, dtype=dtype) for s in shapes]
    return [[torch.nn.Parameter(b.clone()) for b in base] for _ in range(n)]


def _groups(params, wd=(0.1, 0.01)):
    # two groups with different weight decay
    return [{"params": params[:3], "weight_decay": wd[0]}, {"params": params[3:], "weight_decay": wd[1]}]


def _opt(cls, params, **kw):
    return cls(_groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)


def _step(opts_params, step: int, grad_scale=None, found_inf=None, grads=None):
    """One step of every (optimizer, params) pair on the same gradients, lr changing with the step."""
    grads = grads or [torch.randn_like(p) for p in opts_params[0][1]]
    for opt, params in opts_params:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for i, group in enumerate(opt.param_groups):
            group["lr"] = 1e-2 / (step + 1) * (1 + i)
        if grad_scale is not None:
            opt.grad_scale, opt.found_inf = grad_scale, found_inf
        opt.step()
        opt.__dict__.pop("grad_scale", None), opt.__dict__.pop("found_inf", None)
    return grads


def _assert_states_close(a_opt, a_params, b_opt, b_params, tol=1e-6):
    for p, q in zip(a_params, b_params):
        torch.testing.assert_close(p, q, atol=tol, rtol=tol)
        sa, sb = a_opt.state[p], b_opt.state[q]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], atol=tol, rtol=tol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=tol, rtol=tol)
        assert float(sa["step"]) == float(sb["step"])


@needs_triton
@pytest.mark.parametrize("tiling", [{}, SMALL], ids=["default", "small-chunks"])
def test_matches_torch_adamw_over_steps(tiling):
    from tinyllama.kernels.adamw import TritonAdamW, reference_adamw_step

    ours_p, torch_p, ref_p = _twins(3)
    ours = _opt(TritonAdamW, ours_p, **tiling)
    ref = _opt(torch.optim.AdamW, torch_p, foreach=False)
    moments = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device=DEVICE)) for p in ref_p]
    for step in range(4):
        grads = _step([(ours, ours_p), (ref, torch_p)], step)
        assert ours.kernel_params == sum(p.numel() for p in ours_p)  # all of them through the kernel
        for gi, group in enumerate(ours.param_groups):  # the plain-PyTorch reference, group by group
            idx = range(3) if gi == 0 else range(3, len(SHAPES))
            reference_adamw_step([ref_p[i] for i in idx], [grads[i] for i in idx], *zip(*[moments[i] for i in idx]),
                                 lr=group["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=group["weight_decay"])
    _assert_states_close(ours, ours_p, ref, torch_p)
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert all(s["step"].device == ours_p[0].device and s["step"].dtype == torch.float32 and s["step"].dim() == 0
               for s in ours.state.values())


@needs_triton
def test_grad_scale_divides_and_found_inf_changes_nothing():
    from tinyllama.kernels.adamw import TritonAdamW

    ours_p, torch_p = _twins(2)
    ours, ref = _opt(TritonAdamW, ours_p, **SMALL), _opt(torch.optim.AdamW, torch_p, foreach=False)
    zero, scale = torch.zeros((), device=DEVICE), torch.tensor(4.0, device=DEVICE)
    for step in range(2):
        grads = [torch.randn_like(p) for p in ours_p]
        _step([(ours, ours_p)], step, grad_scale=scale, found_inf=zero, grads=grads)
        _step([(ref, torch_p)], step, grads=[g / scale for g in grads])
    _assert_states_close(ours, ours_p, ref, torch_p)
    before = copy.deepcopy((ours_p, ours.state_dict()["state"]))
    _step([(ours, ours_p)], 2, grad_scale=scale, found_inf=torch.ones((), device=DEVICE))
    after = (ours_p, ours.state_dict()["state"])
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    for i, st in before[1].items():
        assert all(torch.equal(st[k], after[1][i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert float(after[1][0]["step"]) == 2


@needs_triton
def test_tensor_lr_is_read_on_the_device_each_step():
    """A group's lr as a one-element tensor (what a CUDA-graphed step gives it): still the kernel, and the value
    the tensor holds at each step, the same as the float lr."""
    from tinyllama.kernels.adamw import TritonAdamW

    ours_p, float_p = _twins(2)
    ours, ref = _opt(TritonAdamW, ours_p, **SMALL), _opt(TritonAdamW, float_p, **SMALL)
    lr_tensors = [torch.zeros((), device=DEVICE) for _ in ours.param_groups]
    for group, t in zip(ours.param_groups, lr_tensors):
        group["lr"] = t
    for step in range(3):
        grads = [torch.randn_like(p) for p in ours_p]
        _step([(ref, float_p)], step, grads=grads)
        for t, group in zip(lr_tensors, ref.param_groups):
            t.fill_(group["lr"])
        for p, g in zip(ours_p, grads):
            p.grad = g.clone()
        ours.step()
        assert ours.kernel_params == sum(p.numel() for p in ours_p)
    _assert_states_close(ours, ours_p, ref, float_p, tol=0)


@needs_triton
def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    from tinyllama.kernels.adamw import TritonAdamW

    run_p, resumed_p = _twins(2)
    run = _opt(TritonAdamW, run_p, **SMALL)
    grads = [[torch.randn_like(p) for p in run_p] for _ in range(4)]
    for step in range(2):
        _step([(run, run_p)], step, grads=grads[step])
    saved = copy.deepcopy(run.state_dict())
    for p, q in zip(resumed_p, run_p):
        p.data.copy_(q.detach())
    for step in range(2, 4):
        _step([(run, run_p)], step, grads=grads[step])
    for state in saved["state"].values():  # as a checkpoint read with map_location="cpu" holds it
        state["step"] = state["step"].cpu()
    resumed = _opt(TritonAdamW, resumed_p, **SMALL)
    resumed.load_state_dict(saved)
    assert all(s["step"].device == resumed_p[0].device for s in resumed.state.values())  # back on the device
    for step in range(2, 4):
        _step([(resumed, resumed_p)], step, grads=grads[step])
    _assert_states_close(run, run_p, resumed, resumed_p, tol=0)
    # the same layout as torch's fused AdamW: its optimizer takes our state_dict
    theirs = _opt(torch.optim.AdamW, _twins(1)[0], fused=True)
    theirs.load_state_dict(run.state_dict())
    assert theirs.state_dict()["state"].keys() == run.state_dict()["state"].keys()


@needs_triton
def test_unsupported_params_fall_back_to_torchs_fused_step():
    """bf16 parameters and amsgrad groups go through torch's fused step in the same call (the same grad_scale
    and found_inf); the kernel takes the rest."""
    from tinyllama.kernels.adamw import TritonAdamW

    fp32 = _twins(2, [(37,), (8, 8)])
    bf16 = _twins(2, [(40,)], dtype=torch.bfloat16)
    def groups(ps):
        return [{"params": [ps[0], ps[2]]}, {"params": [ps[1]], "amsgrad": True}]

    ours_p, ref_p = [fp32[0] + bf16[0], fp32[1] + bf16[1]]
    ours = TritonAdamW(groups(ours_p), lr=1e-2, weight_decay=0.1, **SMALL)
    ref = torch.optim.AdamW(groups(ref_p), lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(2):
        grads = [torch.randn_like(p) for p in ours_p]
        _step([(ours, ours_p), (ref, ref_p)], step, grads=grads, grad_scale=torch.tensor(2.0, device=DEVICE),
              found_inf=torch.zeros((), device=DEVICE))
        assert ours.kernel_params == 37
    _assert_states_close(ours, ours_p[:1], ref, ref_p[:1])
    for p, q in zip(ours_p[1:], ref_p[1:]):  # the same torch step, bit for bit
        assert torch.equal(p, q)
        assert all(torch.equal(ours.state[p][k], ref.state[q][k]) for k in ours.state[p])


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="CPU without the interpreter")
def test_cpu_without_interpreter_is_torchs_fused_step():
    from tinyllama.kernels.adamw import TritonAdamW

    ours_p, ref_p = _twins(2)
    ours, ref = _opt(TritonAdamW, ours_p), _opt(torch.optim.AdamW, ref_p, fused=True)
    for step in range(2):
        _step([(ours, ours_p), (ref, ref_p)], step, grad_scale=torch.tensor(3.0), found_inf=torch.zeros(()))
    assert ours.kernel_params == 0
    _assert_states_close(ours, ours_p, ref, ref_p, tol=0)


@needs_triton
def test_trainer_clip_step_matches_torch_fused():
    """clip_or_step_on_device (clip factor as grad_scale, found_inf) on a small model, ours vs torch's."""
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama
    from tinyllama.train.optim import clip_or_step_on_device

    torch.manual_seed(0)
    with torch.device(DEVICE):
        a = Llama(ModelConfig(vocab_size=96, hidden_size=64, n_layers=1, n_heads=4, n_kv_heads=2,
                              intermediate_size=96, max_seq_len=16))
    b = copy.deepcopy(a)
    opts = [build_optimizer(m, OptimConfig(fused=True, fused_kernel=k, warmup_steps=0, grad_clip=0.5))
            for m, k in ((a, "triton"), (b, "torch"))]
    ids = torch.randint(0, 96, (2, 9), device=DEVICE)
    for _ in range(2):
        for m, opt in zip((a, b), opts):
            loss = m(ids[:, :-1], ids[:, 1:])[1]
            loss.backward()
            assert clip_or_step_on_device(opt, m, 0.5, loss.detach())[1]
            opt.zero_grad(set_to_none=True)
    assert opts[0].kernel_params == sum(p.numel() for p in a.parameters())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_optim_config_chooses_the_kernel():
    from tinyllama.kernels.adamw import TritonAdamW
    from tinyllama.train.config import load_run_config

    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, OptimConfig(fused=True, fused_kernel="triton"))
    assert type(opt) is TritonAdamW and opt.defaults.get("fused")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert type(build_optimizer(model, OptimConfig(fused=True))) is torch.optim.AdamW
    assert not build_optimizer(model, OptimConfig(fused=False, fused_kernel="triton")).defaults.get("fused")
    with pytest.raises(TinyLlamaError, match=re.escape("field 'fused_kernel' is 'cuda'; choose one of torch, triton")):
        build_optimizer(model, OptimConfig(fused_kernel="cuda"))
    assert load_run_config("demo", ["--optim.fused_kernel", "triton"]).optim.fused_kernel == "triton"
    with pytest.raises(TinyLlamaError, match="fused_kernel"):
        load_run_config("demo", ["--optim.fused_kernel", "apex"]).validate()


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available() or INTERPRETED, reason="needs Triton without CUDA")
def test_adamw_kernels_interpreted_on_cpu():
    # every kernel test ran (only this one and the non-interpreted CPU one skip under the interpreter)
    assert run_pytest_interpreted(__file__, timeout=600) >= 8


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED or torch.cuda.is_available(),
                    reason="needs Triton, not interpreted; on a GPU the other tests compile the kernels for real")
def test_adamw_kernels_compile_for_hopper():
    """Both kernels for sm_90 without a GPU; with aligned tables the full blocks use 16-byte accesses."""
    try:
        from test_kernels import _compile_for_hopper
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    from tinyllama.kernels import adamw as A

    ptrs = dict(TENSORS="*i64", CHUNKS="*i64", STEP_TABLE="*i64", GRAD_SCALE="*fp32", FOUND_INF="*fp32",
                COPY_LIKE="*bf16")
    for aligned in (True, False):
        for copies in (False, True):
            k = _compile_for_hopper(A._adamw_kernel, ptrs, dict(HAS_SCALE=True, HAS_INF=True, ALIGNED=aligned,
                                                               COPIES=copies, CHUNK=A.CHUNK_SIZE, BLOCK=A.BLOCK_SIZE),
                                    options=dict(enable_fp_fusion=False))  # as _launch compiles it
            ptx = k.asm["ptx"]
            # no fp fusion: every add and multiply rounds on its own (ptxas may not fuse them either); the
            # multiply-adds are the kernel's explicit fmas
            assert not re.search(r"^\s*(add|mul|sub)\.f32", ptx, re.M)
            vector = len(re.findall(r"ld\.global(\.\w+)*\.v4\.b32", ptx))
            assert (vector >= 8) == aligned, vector  # 4 tensors × 2 per thread in the full-block loop
            # the bf16 copy: 8 elements a thread, one 16-byte store when aligned
            copy_stores = len(re.findall(r"st\.global(\.\w+)*\.v4\.b32", ptx))
            assert copy_stores == (3 * 2 + 1 if copies else 3 * 2) or not aligned, (copies, copy_stores)
    _compile_for_hopper(A._adamw_steps_kernel, dict(TENSORS="*i64", FOUND_INF="*fp32"),
                        dict(HAS_INF=True, BLOCK=A.STEPS_BLOCK))
