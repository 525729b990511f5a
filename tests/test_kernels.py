"""Fused kernels against their plain-PyTorch references: forward and backward on fresh random inputs.

CPU: the chunked linear + cross-entropy (exact in fp64, and under bf16 autocast), and the fast path's
module swaps (same function, same parameter names). GPU (skipped without CUDA): the same under bf16
with the compiled blocks, the SDPA backends, and the Triton kernels.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.kernels import (
    KernelConfig,
    LinearCrossEntropyLoss,
    apply_fast_path,
    causal_attention,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)
from tinyllama.kernels.cross_entropy import default_chunk_rows
from tinyllama.model import Llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NO_COMPILE = dict(compile_blocks=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ce_inputs(n=45, hidden=24, vocab=71, dtype=torch.float64, seed=0, ignore_frac=0.2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g, dtype=dtype).to(device)
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.3).to(device)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return x, w, t.to(device)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 45, 1000])
def test_linear_cross_entropy_exact_in_fp64(chunk_rows):
    x, w, t = _ce_inputs(seed=chunk_rows)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xa, wa, t, chunk_rows=chunk_rows)
    loss.backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(xb @ wb.t(), t, ignore_index=-100)  # fp64 throughout
    ref.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) < 1e-12
    assert _rel(xa.grad, xb.grad) < 1e-12
    assert _rel(wa.grad, wb.grad) < 1e-12


def test_linear_cross_entropy_batched_shape_and_grad_scale():
    x, w, t = _ce_inputs(n=2 * 9, seed=3)
    x3 = x.view(2, 9, -1).clone().requires_grad_()
    wa = w.clone().requires_grad_()
    (3.5 * linear_cross_entropy(x3, wa, t.view(2, 9), chunk_rows=4)).backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (3.5 * reference_linear_cross_entropy(xr, wr, t)).backward()
    assert x3.grad.shape == (2, 9, x.size(1))
    assert _rel(x3.grad.reshape(xr.shape), xr.grad) < 1e-6  # the reference computes its softmax in fp32
    assert _rel(wa.grad, wr.grad) < 1e-6


def test_linear_cross_entropy_all_ignored_is_zero_not_nan():
    x, w, t = _ce_inputs(n=6, seed=4)
    t[:] = -100
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xa, wa, t)
    loss.backward()
    assert loss.item() == 0.0
    assert xa.grad.abs().max().item() == 0.0 and wa.grad.abs().max().item() == 0.0


def test_linear_cross_entropy_bf16_autocast_close_to_fp32():
    x, w, t = _ce_inputs(n=64, hidden=32, vocab=500, dtype=torch.float32, seed=5)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(xa, wa, t, chunk_rows=16)
    loss.backward()
    assert xa.grad.dtype == torch.float32 and wa.grad.dtype == torch.float32  # grads in the params' dtype
    # bf16 rows (the fast path's bf16 residual stream): each chunk's input gradient is written into its slice
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_b = linear_cross_entropy(xb, w.clone().requires_grad_(), t, chunk_rows=16)
    loss_b.backward()
    assert xb.grad.dtype == torch.bfloat16
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference_linear_cross_entropy(xr, wr, t)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    assert _rel(xa.grad, xr.grad) < 2e-2
    assert _rel(wa.grad, wr.grad) < 2e-2
    assert abs(loss_b.item() - ref.item()) / ref.item() < 2e-2 and _rel(xb.grad, xr.grad) < 3e-2


def test_linear_cross_entropy_rejects_mismatched_targets():
    x, w, t = _ce_inputs(n=8)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, w, t[:5])


def test_default_chunk_rows_equal_chunks():
    assert default_chunk_rows(16384, 32000) == 4096  # 4 equal chunks of ~0.5 GB fp32 logits
    assert default_chunk_rows(100, 32000) == 100
    rows = default_chunk_rows(50_000, 32000)
    assert rows * 4 * 32000 <= 512 * 1024**2 + 4 * 32000 and -(-50_000 // rows) * rows - 50_000 < rows


# ---- the fast path on the model ---------------------------------------------------------------------------


def _tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Llama(ModelConfig.from_name("tinyllama-tiny")).to(dtype)


@pytest.mark.parametrize(
    "kw",
    [
        dict(NO_COMPILE),
        dict(NO_COMPILE, fuse_projections=True),
        dict(NO_COMPILE, attention_backend="math", ce_chunk_rows=5),
        dict(NO_COMPILE, fused_cross_entropy=False, bf16_residual=False),
        dict(fused_blocks=True),
    ],
)
def test_fast_path_same_function_and_names(kw):
    ref, fast = _tiny(), _tiny()
    names = [n for n, _ in ref.named_parameters()]
    assert apply_fast_path(fast, KernelConfig(**kw)) is fast
    assert [n for n, _ in fast.named_parameters()] == names
    assert fast.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(0, 32000, (2, 21))
    targets = ids.roll(-1, 1)
    targets[0, :3] = -100
    la = ref(ids, targets)[1]
    lb = fast(ids, targets)[1]
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5  # the model's own loss takes its softmax in fp32
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert _rel(q.grad, p.grad) < 1e-5, n
    # inference without targets: the same function, bit for bit in fp64 where the blocks run the reference maths;
    # under Triton's interpreter the fused blocks' kernels compute in fp32 (found running this file interpreted)
    fused_kernels = INTERPRETED and kw.get("fused_blocks")
    with torch.no_grad():
        assert torch.allclose(ref(ids), fast(ids), atol=1e-5 if fused_kernels else 1e-10)


@pytest.mark.parametrize("kw", [dict(fuse_projections=True), dict(fused_blocks=True)])
def test_fast_path_generation_with_cache_unchanged(kw):
    ref, fast = _tiny(seed=1), _tiny(seed=1)
    apply_fast_path(fast, KernelConfig(compile_blocks=False, **kw))
    ids = torch.randint(0, 32000, (1, 7))
    outs = []
    for m in (ref, fast):
        m.setup_cache(1, 16, dtype=torch.float64)
        with torch.no_grad():
            a = m(ids, input_pos=torch.arange(7))
            b = m(ids[:, -1:], input_pos=torch.tensor([7]))
        outs.append((a, b))
        m.clear_cache()
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-10)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-10)


def test_bf16_residual_under_autocast():
    m = _tiny(dtype=torch.float32)
    apply_fast_path(m, KernelConfig(compile_blocks=False))
    ids = torch.randint(0, 32000, (1, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.embed_tokens(ids).dtype == torch.bfloat16
    assert m.embed_tokens(ids).dtype == torch.float32  # no autocast: untouched


def test_kernel_config_validation_and_resolution():
    with pytest.raises(TinyLlamaError, match="attention_backend"):
        KernelConfig(attention_backend="fastest")
    with pytest.raises(TinyLlamaError, match="ce_chunk_rows"):
        KernelConfig(ce_chunk_rows=0)
    with pytest.raises(TinyLlamaError, match="activation_memory_budget"):
        KernelConfig(activation_memory_budget=1.5)
    with pytest.raises(TinyLlamaError, match="unknown field"):
        KernelConfig.from_dict({"fused_ce": True})
    with pytest.raises(TinyLlamaError, match="Llama"):
        apply_fast_path(torch.nn.Linear(2, 2))
    m = _tiny()
    apply_fast_path(m, {"compile_blocks": False, "fused_cross_entropy": True})
    assert isinstance(m.loss_fn, LinearCrossEntropyLoss)


def test_fast_path_as_the_trainer_calls_it():
    # tinyllama.train passes its ModelConfig: defaults; blocks are compiled only on a GPU.
    m = _tiny()
    assert apply_fast_path(m, m.config) is m
    assert isinstance(m.loss_fn, LinearCrossEntropyLoss)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in m.layers)
    ids = torch.randint(0, 32000, (1, 9))
    assert torch.isfinite(m(ids, ids)[1])


def test_causal_attention_backends_match_reference_cpu():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) / 8**0.5
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    ref = s.softmax(-1) @ vv
    for backend in ("auto", "math"):
        assert _rel(causal_attention(q, k, v, backend), ref) < 1e-12


def test_fa4_backend_says_what_it_needs():
    from tinyllama.kernels.attention import fa4_problem

    problem = fa4_problem(on_gpu=torch.cuda.is_available())
    if problem is None:
        pytest.skip("flash-attn-4 runs here")
    with pytest.raises(TinyLlamaError, match="attention_backend 'fa4' .*(FlashAttention-4|CUDA|capability)"):
        apply_fast_path(_tiny(), KernelConfig(compile_blocks=False, attention_backend="fa4"))
    if importlib.util.find_spec("flash_attn") is None:
        assert "[fa4]" in problem
    q = torch.randn(1, 4, 9, 8)
    with pytest.raises(TinyLlamaError, match="'fa4'"):
        causal_attention(q, q[:, :2], q[:, :2], "fa4")  # CPU tensors


# ---- GPU ----------------------------------------------------------------------------------------------------


@cuda
def test_linear_cross_entropy_cuda_bf16_matches_unfused():
    x, w, t = _ce_inputs(n=1000, hidden=256, vocab=4000, dtype=torch.float32, seed=7, device="cuda")
    res = {}
    for name in ("fused", "ref"):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(xa, wa, t, chunk_rows=300) if name == "fused" else reference_linear_cross_entropy(xa, wa, t)
        loss.backward()
        res[name] = (loss.detach(), xa.grad, wa.grad)
    assert _rel(res["fused"][0], res["ref"][0]) < 1e-4
    assert _rel(res["fused"][1], res["ref"][1]) < 1e-2
    assert _rel(res["fused"][2], res["ref"][2]) < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_weight_grad_accumulates_in_place_in_fp32(device):
    """bf16 rows, an fp32 gradient: the product lands in fp32 (on CUDA the GEMM adds into it: no bf16 rounding of
    the chunk's product, no add pass), the same tensor is returned, and the sum is the fp64 one to fp32 error."""
    from tinyllama.kernels.matmul import _writes_fp32, weight_grad

    g = torch.Generator().manual_seed(3)
    dys = [torch.randn(300, 96, generator=g).bfloat16().to(device) for _ in range(3)]
    xs = [torch.randn(300, 64, generator=g).bfloat16().to(device) for _ in range(3)]
    acc = weight_grad(dys[0], xs[0], torch.float32)
    assert acc.dtype == torch.float32 and acc.shape == (96, 64)
    for dy, x in zip(dys[1:], xs[1:]):
        assert weight_grad(dy, x, torch.float32, accumulate=acc) is acc
    want = sum(dy.double().t() @ x.double() for dy, x in zip(dys, xs))
    assert _rel(acc, want) < 1e-6
    if device == "cuda":
        assert _writes_fp32("addmm", acc.device), "torch.addmm(out_dtype=float32) should run on this GPU"


def _fa4_skip():
    from tinyllama.kernels.attention import fa4_problem

    problem = fa4_problem(on_gpu=True)
    if problem:
        pytest.skip(f"attention backend fa4 {problem}")


@cuda
@pytest.mark.parametrize("backend,layout", [("auto", "bhtd"), ("flash", "bhtd"), ("cudnn", "bhtd"),
                                            ("efficient", "bhtd"), ("fa4", "bhtd"), ("fa4", "bthd")])
def test_causal_attention_backends_cuda(backend, layout):
    if backend == "fa4":
        _fa4_skip()
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(heads):  # bthd: (B, H, T, D) views of (B, T, H, D) storage, as the projections write it
        shape = (2, 256, heads, 64) if layout == "bthd" else (2, heads, 256, 64)
        t = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        return t, (t.transpose(1, 2) if layout == "bthd" else t)

    (q0, q), (k0, k), (v0, v) = make(8), make(2), make(2)
    try:
        y = causal_attention(q, k, v, backend)
    except RuntimeError as e:
        pytest.skip(f"backend {backend} unavailable here: {e}")
    assert y.shape == q.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    grads = [t.grad.transpose(1, 2) if layout == "bthd" else t.grad for t in (q0, k0, v0)]
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    yr = causal_attention(qr, kr, vr, "math")
    yr.backward(dy.double())
    assert _rel(y, yr) < 1e-2
    for a, b in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert _rel(a, b) < 2e-2


def _reference_and_fast_loss_and_grads_cuda(kernels: KernelConfig) -> list:
    """[(loss, flat grads)] of the reference model and of the same model with `kernels`, bf16 autocast."""
    cfg = ModelConfig.from_name("tinyllama-tiny")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 65), device="cuda")
    out = []
    for fast in (False, True):
        torch.manual_seed(0)
        m = Llama(cfg).cuda()
        if fast:
            apply_fast_path(m, kernels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(ids[:, :-1], ids[:, 1:])[1]
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    return out


@cuda
@pytest.mark.parametrize("kw", [dict(compile_blocks=True),
                                dict(compile_blocks=True, fuse_projections=True, activation_memory_budget=0.7)])
def test_fast_path_compiled_blocks_cuda(kw):
    out = _reference_and_fast_loss_and_grads_cuda(KernelConfig(**kw))
    torch._dynamo.reset()
    assert _rel(out[1][0], out[0][0]) < 1e-3
    assert _rel(out[1][1], out[0][1]) < 5e-2  # bf16 residual + different rounding order


# ---- Triton kernels: on the GPU, or on the CPU through Triton's interpreter ---------------------------------

import importlib.util  # noqa: E402
import os  # noqa: E402

from conftest import run_pytest_interpreted  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_cases(device):
    from tinyllama.kernels import triton_ops as T
    from tinyllama.model import RMSNorm, apply_rope, rope_cache

    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the interpreter computes through numpy
    tol = 1e-6 if device == "cpu" else 1e-2
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    for n in (64, 50):  # power of two and ragged widths
        x = torch.randn(37, n, generator=g).to(device, dtype)
        w = (1 + 0.1 * torch.randn(n, generator=g)).to(device)
        dy = torch.randn(37, n, generator=g).to(device, dtype)
        ref = RMSNorm(n).to(device).double()
        ref.weight.data.copy_(w)
        xr = x.double().requires_grad_()
        ref(xr).backward(dy.double())
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        ya = T.rms_norm(xa, wa, 1e-5)
        ya.backward(dy.to(ya.dtype))
        assert _rel(ya, ref(xr)) < tol and _rel(xa.grad, xr.grad) < tol and _rel(wa.grad, ref.weight.grad) < tol
    gate = (torch.randn(33, 100, generator=g) * 2).to(device, dtype)
    up = torch.randn(33, 100, generator=g).to(device, dtype)
    dh = torch.randn(33, 100, generator=g).to(device, dtype)
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    hr = F.silu(gr) * ur
    hr.backward(dh.double())
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ha = T.swiglu(ga, ua)
    ha.backward(dh)
    assert _rel(ha, hr) < tol and _rel(ga.grad, gr.grad) < tol and _rel(ua.grad, ur.grad) < tol
    cos, sin = rope_cache(16, 8, 10000.0, device=device)
    for heads in (4, 3):
        x = torch.randn(2, 16, heads, 8, generator=g).to(device, dtype)
        dy = torch.randn_like(x)
        xr = x.double().requires_grad_()
        yr = apply_rope(xr.transpose(1, 2), cos.double(), sin.double()).transpose(1, 2)
        yr.backward(dy.double())
        xa = x.clone().requires_grad_()
        ya = T.rope(xa, cos.to(dtype), sin.to(dtype))
        ya.backward(dy)
        assert _rel(ya, yr) < tol and _rel(xa.grad, xr.grad) < tol


@pytest.mark.skipif(not (HAS_TRITON and (torch.cuda.is_available() or INTERPRETED)), reason="needs Triton on CUDA or TRITON_INTERPRET=1")
def test_triton_kernels_match_references():
    _triton_cases("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available() or INTERPRETED, reason="needs Triton without CUDA")
def test_triton_kernels_interpreted_on_cpu():
    assert run_pytest_interpreted(f"{__file__}::test_triton_kernels_match_references", timeout=600) == 1


@cuda
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_fast_path_triton_eager_cuda():
    out = _reference_and_fast_loss_and_grads_cuda(KernelConfig(compile_blocks=False, triton_kernels=True))
    assert _rel(out[1][0], out[0][0]) < 1e-3
    assert _rel(out[1][1], out[0][1]) < 5e-2


# ---- the fused training block -------------------------------------------------------------------------------


def _saved_activation_bytes(block: torch.nn.Module, x: torch.Tensor, cos, sin) -> int:
    """Bytes of the distinct tensors autograd saves for one block's backward, weights and rotary tables aside."""
    rows = {x.shape[0], x.shape[0] * x.shape[1]}
    seen: dict = {}

    def pack(t):
        if t.dim() and t.shape[0] in rows:  # activations lead with the batch or batch·time
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cos, sin)
    return sum(seen.values())


def test_fused_block_keeps_two_thirds_of_the_activations():
    from tinyllama.kernels.fused_block import FusedBlock
    from tinyllama.model import Block, rope_cache

    cfg = ModelConfig.from_name("tinyllama-tiny")
    B, T, C, F_, H, KV, D = 3, 37, cfg.hidden_size, cfg.intermediate_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    plain = Block(cfg)
    fused = Block(cfg)
    fused.__class__ = FusedBlock
    x = torch.randn(B, T, C, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t.to(torch.bfloat16) for t in rope_cache(T, D, cfg.rope_theta))
    got, ref = _saved_activation_bytes(fused, x, cos, sin), _saved_activation_bytes(plain, x, cos, sin)
    n = B * T * 2  # bytes per bf16 feature
    # Fused: x, q/k/v rotated, attention output (+ fp32 log-sum-exp per head), second residual, gate|up, 2 rstd.
    expected = n * (C + (H + 2 * KV) * D + H * D + C + 2 * F_) + B * T * 4 * 2
    assert got <= expected + B * H * T * 4 + 64, (got, expected)
    # The plain block also keeps both normalised inputs and silu(gate)·up (and more, unfused).
    assert got <= ref - n * (2 * C + F_), (got, ref)


def test_fused_block_saves_bf16_weights_themselves_not_copies():
    # FSDP2 hands the block bf16 weights: the q/k/v and gate/up stacks are rebuilt in backward instead of
    # being kept (a second copy of memory FSDP2 holds anyway).
    from tinyllama.kernels.fused_block import FusedBlock
    from tinyllama.model import Block, rope_cache

    cfg = ModelConfig.from_name("tinyllama-tiny")
    block = Block(cfg).to(torch.bfloat16)
    block.__class__ = FusedBlock
    params = {p.data_ptr() for p in block.parameters()}
    weight_like = []

    def pack(t):
        if t.dim() == 2 and t.shape[1] in (cfg.hidden_size, cfg.intermediate_size) and t.shape[0] != 3 * 9:
            weight_like.append(t.data_ptr() in params)
        return t

    x = torch.randn(3, 9, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t.to(torch.bfloat16) for t in rope_cache(9, cfg.head_dim, cfg.rope_theta))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, cos, sin)
    assert weight_like and all(weight_like)
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if HAS_TRITON and INTERPRETED else []))
def test_fused_block_residual_adds_accumulate_into_the_norms_copy(monkeypatch, impl):
    # With a bf16 residual stream, each norm kernel writes a copy of the residual it reads, and the next
    # output projection adds into that copy in place (addmm_): not addmm into a new tensor, whose CUDA path
    # copies the residual first (`memcpy128`, 1.5 ms a step at 1.1B). Same bits as the out-of-place adds;
    # the block's input (saved for the first norm's backward) is left as it was.
    from torch.utils._python_dispatch import TorchDispatchMode

    from tinyllama.kernels import fused_block as FB
    from tinyllama.model import Block, rope_cache

    cfg = ModelConfig.from_name("tinyllama-tiny")
    torch.manual_seed(0)
    base = Block(cfg)
    x = torch.randn(2, 12, cfg.hidden_size).to(torch.bfloat16)
    dy = torch.randn(2, 12, cfg.hidden_size).to(torch.bfloat16)
    cos, sin = (t.to(torch.bfloat16) for t in rope_cache(12, cfg.head_dim, cfg.rope_theta))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    def run(owned: bool):
        if not owned:
            monkeypatch.setattr(FB, "_owned_residual", lambda t, dtype: False)
        block = Block(cfg)
        block.load_state_dict(base.state_dict())
        block.__class__ = FB.FusedBlock
        block.kernel_impl = impl
        xa = x.clone().requires_grad_()
        with Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xa, cos, sin)
        y.backward(dy)
        monkeypatch.undo()
        assert torch.equal(xa.detach(), x)
        return [y, xa.grad] + [p.grad for p in block.parameters()], ops.seen

    new, new_ops = run(owned=True)
    old, old_ops = run(owned=False)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    assert new_ops.count("aten.addmm_.default") == 2 and "aten.addmm.out" not in new_ops
    assert old_ops.count("aten.addmm.out") == 2 and "aten.addmm_.default" not in old_ops


def test_fused_blocks_with_activation_checkpointing_same_grads():
    # Recomputing a fused block in backward makes new residual copies and adds into them again in place:
    # the same loss and gradients as without recomputation (bf16 residual stream, bf16 autocast).
    from tinyllama.train.distributed import apply_activation_checkpointing

    ids = torch.randint(0, 32000, (2, 17))

    def run(recompute: bool):
        m = _tiny(dtype=torch.float32)
        apply_fast_path(m, KernelConfig(fused_blocks=True, fused_cross_entropy=False))
        if recompute:
            apply_activation_checkpointing(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids, ids.roll(-1, 1))[1]
        loss.backward()
        return [loss.detach()] + [p.grad for p in m.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_fused_blocks_setting_clashes_are_refused():
    for other in (dict(compile_blocks=True), dict(triton_kernels=True), dict(activation_memory_budget=0.7)):
        with pytest.raises(TinyLlamaError, match="fused_blocks is on together with"):
            apply_fast_path(_tiny(), KernelConfig(fused_blocks=True, **other))


def test_fused_block_bf16_error_within_the_reference_error():
    """Under bf16 autocast, the fused block's loss and gradients are as close to the fp64 truth as the plain
    model's are (the same rounding level; different rounding order)."""
    ids = torch.randint(0, 32000, (2, 33))

    def run(dtype, kernels=None, autocast=False):
        m = _tiny(dtype=dtype)
        if kernels:
            apply_fast_path(m, kernels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(ids, ids.roll(-1, 1))[1]
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])

    truth = run(torch.float64)
    ref = run(torch.float32, autocast=True)
    fused = run(torch.float32, KernelConfig(fused_blocks=True, fused_cross_entropy=False, bf16_residual=False), True)
    assert _rel(fused[1], truth[1]) <= 1.25 * _rel(ref[1], truth[1])
    assert abs(fused[0] - truth[0]) <= max(2 * abs(ref[0] - truth[0]), 2e-3)


def _fused_block_cases(device):
    from tinyllama.kernels import fused_block as FB
    from tinyllama.kernels.fused_block import FusedBlock
    from tinyllama.model import Block, rope_cache

    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the interpreter computes through numpy
    tol = 1e-5 if device == "cpu" else 1e-2
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt)

    def close(a, b):
        return _rel(a, b) < tol

    for n in (64, 50):  # power of two and ragged widths
        x, w = rnd(37, n), 1 + 0.1 * rnd(n, dt=torch.float32)
        outs = {impl: FB.rms_norm_rows(x, w, 1e-5, dtype, impl) for impl in ("triton", "torch")}
        assert all(close(a, b) for a, b in zip(*outs.values()))
        dh, dres = rnd(37, n), rnd(37, n)
        for dr in (None, dres):
            grads = {}
            for impl, (h, rstd) in outs.items():
                grads[impl] = FB.rms_norm_backward(dh, x, rstd, w, dr, dtype, impl)
                assert torch.equal(grads[impl][1], h)  # h recomputed in backward = the forward's h
            assert all(close(a, b) for a, b in zip(*grads.values()))
    for D, n_q, n_kv in ((8, 4, 2), (24, 3, 1)):  # head dims whose half is and is not a power of two
        cos, sin = (t.to(dtype) for t in rope_cache(16, D, 10000.0, device=device))
        qkv = rnd(2, 16, (n_q + 2 * n_kv) * D)
        outs = [FB.qkv_rope(qkv, cos, sin, n_q, n_kv, D, impl) for impl in ("triton", "torch")]
        assert all(close(a, b) for a, b in zip(*outs))
        dq, dk, dv = (rnd(2, n_q, 16, D).transpose(1, 2), rnd(2, 16, n_kv, D),
                      rnd(2, n_kv, 16, D).transpose(1, 2))  # any strides
        grads = [FB.qkv_rope_backward(dq, dk, dv, cos, sin, impl) for impl in ("triton", "torch")]
        assert close(*grads)
    gu, da = rnd(33, 200, scale=2.0), rnd(33, 100)
    assert close(FB.swiglu_rows(gu, "triton"), FB.swiglu_rows(gu, "torch"))
    grads = [FB.swiglu_rows_backward(da, gu, impl) for impl in ("triton", "torch")]
    assert all(close(a, b) for a, b in zip(*grads))
    assert torch.equal(grads[0][1], FB.swiglu_rows(gu, "triton"))
    # The whole block, forward and backward: Triton kernels against the same block on the reference maths.
    cfg = ModelConfig.from_name("tinyllama-tiny")
    base = Block(cfg).to(device)
    x, dy = rnd(2, 24, cfg.hidden_size), rnd(2, 24, cfg.hidden_size)
    cos, sin = (t.to(dtype) for t in rope_cache(24, cfg.head_dim, cfg.rope_theta, device=device))
    results = []
    for impl in ("triton", "torch"):
        block = Block(cfg).to(device)
        block.load_state_dict(base.state_dict())
        block.__class__ = FusedBlock
        block.kernel_impl = impl
        xa = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            y = block(xa, cos, sin)
        y.backward(dy)
        results.append([y, xa.grad] + [p.grad for p in block.parameters()])
    assert all(close(a, b) for a, b in zip(*results))


@pytest.mark.skipif(not (HAS_TRITON and (torch.cuda.is_available() or INTERPRETED)), reason="needs Triton on CUDA or TRITON_INTERPRET=1")
def test_fused_block_kernels_match_references():
    _fused_block_cases("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available() or INTERPRETED, reason="needs Triton without CUDA")
def test_fused_block_kernels_interpreted_on_cpu():
    assert run_pytest_interpreted(f"{__file__}::test_fused_block_kernels_match_references", timeout=600) == 1


@cuda
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("attention", ["auto", "fa4"])
def test_fast_path_fused_blocks_cuda(attention):
    if attention == "fa4":
        _fa4_skip()
    out = _reference_and_fast_loss_and_grads_cuda(KernelConfig(fused_blocks=True, attention_backend=attention))
    assert _rel(out[1][0], out[0][0]) < 1e-3
    assert _rel(out[1][1], out[0][1]) < 5e-2


def _compile_for_hopper(fn, pointers: dict, constexprs: dict, floats=("eps",), aligned: bool = False,
                        options: Optional[dict] = None):
    """Compile a @triton.jit kernel for sm_90 ahead of time (PTX and ptxas, no GPU needed). aligned: every
    pointer and integer argument divisible by 16 (i32), as the JIT specialises a launch's: its loops are then
    software-pipelined as on the GPU (shared memory as a launch needs it). options: e.g. num_warps, num_stages."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        sig[name] = ("constexpr" if name in constexprs else pointers.get(name)
                     or ("fp32" if name in floats else "i32" if aligned else "i64"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values())
             if aligned and (t.startswith("*") or t == "i32")}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs Triton (not interpreted)")
def test_training_kernels_compile_for_hopper():
    # The interpreter (CPU tests) runs a kernel's Python, not Triton's compiler: this catches what only the
    # compiler rejects (e.g. a non-power-of-two arange), for the H100's sm_90, without a GPU.
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    from tinyllama.kernels import fused_block as FB
    from tinyllama.kernels import triton_ops as T

    bf = "*bf16"
    for head_dim, n_q, n_kv in ((64, 32, 4), (24, 3, 1)):
        for backward in (False, True):
            _compile_for_hopper(FB._qkv_rope_kernel, dict.fromkeys(["PACKED", "Q", "K", "V", "COS", "SIN"], bf),
                                dict(N_Q=n_q, N_KV=n_kv, HEAD_DIM=head_dim, BLOCK_H=triton_next_pow2(n_q + 2 * n_kv),
                                     BLOCK_D=triton_next_pow2(head_dim // 2), BACKWARD=backward))
    norm_ptrs = dict(DY=bf, X=bf, DX=bf, DRES=bf, H=bf, W="*fp32", RSTD="*fp32", DW_PART="*fp32")
    for flags in ((True, True), (False, False)):
        _compile_for_hopper(T._rms_norm_bwd, norm_ptrs, dict(HAS_DRES=flags[0], STORE_H=flags[1], BLOCK=2048))
    # 3: the decode step's split-K sums added to x first; STORE_COPY: the training block's residual copy
    stores = {}
    for splits, pdl, copy in ((0, False, False), (0, False, True), (3, False, False), (3, True, False)):
        kernel = _compile_for_hopper(T._rms_norm_fwd, dict(X=bf, Y=bf, W="*fp32", RSTD="*fp32", PART="*fp32",
                                                           COPY=bf),
                                     dict(BLOCK=2048, SPLITS=splits, PDL=pdl, STORE_COPY=copy))
        stores[splits, pdl, copy] = kernel.asm["ptx"].count("st.global")
        # PDL (the decode step's norm kernels): the wait for the previous kernel and the early start of the next
        ptx = kernel.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == pdl
        if pdl:  # the next product may start (and read its weights) while this kernel waits and runs
            assert ptx.find("griddepcontrol.launch_dependents") < ptx.find("griddepcontrol.wait")
    # STORE_COPY compiles in the copy's stores; without it there are none beyond y's and rstd's
    assert stores[0, False, True] > stores[0, False, False] > 0
    swiglu_ptrs = dict.fromkeys(["DH", "G", "U", "DG", "DU", "H"], bf)
    for store in (True, False):
        _compile_for_hopper(T._swiglu_bwd, swiglu_ptrs, dict(STORE_H=store, BLOCK=1024))
    _compile_for_hopper(T._swiglu_fwd, swiglu_ptrs, dict(BLOCK=1024))


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
