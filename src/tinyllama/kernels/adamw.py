"""A multi-tensor AdamW step in Triton: every fp32 parameter of the model in one launch.

Why: the step streams 28 bytes a parameter (reads param, grad, exp_avg, exp_avg_sq; writes param,
exp_avg, exp_avg_sq), ~31 GB for the 1.1B model. torch's fused AdamW took 10.7 ms of the H200 step's
profile (it also writes the unscaled gradient back when given grad_scale, 4 more bytes a parameter: ~3.3
TB/s); the card streams ~4.3 TB/s, ~7.2 ms for 28 bytes.

Layout (all on the device):
  tensor table  int64 (T, 7): param, exp_avg, exp_avg_sq and step addresses, numel, param-group index, and
                the address of the parameter's compute-dtype copy (0: none; see below); cached, keyed on
                those addresses and sizes (rebuilt when a state tensor, parameter or copy moves)
  chunk table   int64 (C, 2): tensor index, first element; each program streams one chunk of CHUNK_SIZE
                elements in BLOCK_SIZE blocks (unmasked full blocks, one masked tail); cached with the above
  step table    int64 (T + 8·G,): the gradient addresses (autograd allocates new gradients every step) and
                each group's hyperparameters as float64 bits (lr, weight decay, beta1, beta2, 1 - beta1,
                1 - beta2, eps, 0): filled on the host every step into one of two pinned buffers (in turn, each
                reused once its last copy has run) and copied asynchronously, so lr changes need no recompile
                and no host sync
Two launches a step: a one-program kernel adds 1 to every step count (unless found_inf), then the update
kernel, which reads the new count for the bias corrections (in-kernel, fp32: beta**step as exp2).

Inside a CUDA graph capture (`tinyllama.train.graph`): the copy is captured from a third pinned buffer that
is never written again, which holds the gradient addresses the replays write to (a graph's are fixed), and a
group's lr may be a device tensor: it is copied into the table on the device after that copy, so each
replay reads the value the tensor holds then.

Compute-dtype copies (`TritonAdamW.copies`, a `tinyllama.kernels.weight_copies.ComputeWeights`): where a
parameter has one, the update also stores the new weight rounded to that dtype (bf16) into it, 2 bytes a
parameter more, so the forward reads it instead of casting the fp32 weight again (a cast reads 4 bytes and
writes 2). After each step the copies are marked current for the weights' present versions.

Math: torch.optim.AdamW's single-tensor step (`reference_adamw_step`), in fp32, the gradient divided by
`grad_scale` when the optimizer has one; with a nonzero `found_inf` nothing changes, step counts
included. Unlike torch's fused kernel the unscaled gradient is not written back to .grad (the trainer drops
the gradients after the step). Results agree with torch's to fp32 rounding, not bit for bit.

`TritonAdamW` is torch's fused AdamW (same defaults, state layout and state_dict, so checkpoints move
between the two) whose step runs these kernels. The kernel takes dense, contiguous fp32 parameters and
gradients, plain tensors on one CUDA device (or any tensors under TRITON_INTERPRET=1, for tests); every
other parameter (DTensor under FSDP2, bf16, non-contiguous or sparse gradients, amsgrad/maximize groups,
an lr tensor of more than one element) falls back to torch's fused step in the same call, with the same grad_scale/found_inf.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

# Bandwidth reasoning (H200: 132 SMs, ~4.3 TB/s, ~1 µs memory latency -> ~4 MB must be in flight): a block
# of 1024 fp32 elements over 4 warps is 8 elements (two 16-byte loads) per thread and tensor, 16 KB of
# loads in flight per program and iteration; with ~16 programs resident per SM that is ~30 MB, ample. A
# chunk of 32 K elements (0.9 MB of traffic) amortises each program's table reads (three dependent loads)
# over 32 blocks, while 34 K chunks for 1.1 B parameters keep the last wave short. perf/adamw_bench.py
# sweeps these on the GPU.
CHUNK_SIZE = 32768
BLOCK_SIZE = 1024
NUM_WARPS = 4
TABLE_COLS = 7  # param, exp_avg, exp_avg_sq, step, numel, group, compute-dtype copy (0: none)
HYPER_COLS = 8  # lr, weight decay, beta1, beta2, 1 - beta1, 1 - beta2, eps, (pad)
STEPS_BLOCK = 256


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


try:
    from torch.optim.adam import adam as _torch_adam  # the functional step torch's AdamW runs
except ImportError:  # pragma: no cover - older torch
    _torch_adam = None


# ---- plain-PyTorch reference (the kernel's semantics) ---------------------------------------------
@torch.no_grad()
def reference_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                         steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float], eps: float,
                         weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                         found_inf: Optional[torch.Tensor] = None) -> None:
    """One AdamW step in place, as torch.optim.AdamW(foreach=False) computes it (0-dim step tensors):
    decoupled decay p *= 1 - lr·wd; m = lerp(m, g, 1 - beta1); v = beta2·v + (1 - beta2)·g²; with the
    incremented step t, p -= lr / (1 - beta1^t) · m / (sqrt(v) / sqrt(1 - beta2^t) + eps). g is divided by
    grad_scale when given; with found_inf nonzero nothing changes (reads found_inf on the host)."""
    if found_inf is not None and float(found_inf) != 0:
        return
    beta1, beta2 = betas
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if grad_scale is not None:
            g = g / grad_scale
        s += 1
        t = float(s)
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


# ---- kernels --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _f64(TABLE, i):
        return tl.load(TABLE + i).to(tl.float64, bitcast=True).to(tl.float32)

    @triton.jit
    def _to_copy_dtype(p, dt: tl.constexpr):
        # p rounded to dt as torch's .to(dt) rounds (nearest, ties to even). For bf16 in integer ops: the GPU's
        # cvt.rn gives the same, Triton's interpreter truncates, and the copies must equal torch's cast on both.
        if dt == tl.bfloat16:
            bits = p.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(p != p, 0x7FC0, rounded)  # NaN stays NaN (rounding could carry it to inf)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return p.to(dt)

    @triton.jit
    def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, has_copy, offs, mask, scale, decay, w1, beta2, omb2, eps,
                     step_size, bc2_sqrt, MASKED: tl.constexpr, COPIES: tl.constexpr):
        if MASKED:
            p = tl.load(p_ptr + offs, mask=mask)
            g = tl.load(g_ptr + offs, mask=mask)
            m = tl.load(m_ptr + offs, mask=mask)
            v = tl.load(v_ptr + offs, mask=mask)
        else:
            p = tl.load(p_ptr + offs)
            g = tl.load(g_ptr + offs)
            m = tl.load(m_ptr + offs)
            v = tl.load(v_ptr + offs)
        # Every multiply-add is an explicit fma and the kernel is compiled without fp fusion (`_launch`): left to
        # the compilers (LLVM, and ptxas on mul/add without .rn), which products are fused into adds depended on
        # the code around them: with COPIES the weights without a copy came out 1 ulp apart (H100).
        g = tl.div_rn(g, scale)
        p = p * decay
        # torch's lerp: from the nearer end
        if w1 < 0.5:
            m = tl.fma(w1, g - m, m)
        else:
            m = tl.fma(m - g, 1.0 - w1, g)
        v = tl.fma(v, beta2, omb2 * g * g)
        # IEEE-rounded sqrt and divisions as torch's (the approximate ones are 2 ulp; compute is not the limit)
        p = tl.fma(-step_size, tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps), p)
        if MASKED:
            tl.store(p_ptr + offs, p, mask=mask)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            if COPIES:
                if has_copy:
                    tl.store(c_ptr + offs, _to_copy_dtype(p, c_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(p_ptr + offs, p)
            tl.store(m_ptr + offs, m)
            tl.store(v_ptr + offs, v)
            if COPIES:
                if has_copy:  # one value for the whole tensor: a uniform branch
                    tl.store(c_ptr + offs, _to_copy_dtype(p, c_ptr.dtype.element_ty))

    @triton.jit
    def _adamw_kernel(TENSORS, CHUNKS, STEP_TABLE, GRAD_SCALE, FOUND_INF, COPY_LIKE, n_tensors,
                      HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr, COPIES: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # COPY_LIKE: any tensor of the copies' dtype (its pointer type is the copies')
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(CHUNKS + 2 * pid)
        start = tl.load(CHUNKS + 2 * pid + 1)
        row = TENSORS + t * 7
        f32p = tl.pointer_type(tl.float32)
        p_ptr = tl.load(row).to(f32p, bitcast=True)
        m_ptr = tl.load(row + 1).to(f32p, bitcast=True)
        v_ptr = tl.load(row + 2).to(f32p, bitcast=True)
        step = tl.load(tl.load(row + 3).to(f32p, bitcast=True))  # already incremented by _adamw_steps_kernel
        numel = tl.load(row + 4)
        hyper = n_tensors + tl.load(row + 5) * 8
        g_ptr = tl.load(STEP_TABLE + t).to(f32p, bitcast=True)
        c_ptr = COPY_LIKE
        has_copy = False
        if COPIES:
            c_addr = tl.load(row + 6)
            has_copy = c_addr != 0
            c_ptr = c_addr.to(COPY_LIKE.dtype, bitcast=True)
        if ALIGNED:  # every address 16-byte aligned, chunk starts multiples of CHUNK: 16-byte accesses
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            start = tl.multiple_of(start, CHUNK)
            if COPIES:
                c_ptr = tl.multiple_of(c_ptr, 16)
        lr = _f64(STEP_TABLE, hyper)
        decay = tl.fma(-lr, _f64(STEP_TABLE, hyper + 1), 1.0)
        beta1 = _f64(STEP_TABLE, hyper + 2)
        beta2 = _f64(STEP_TABLE, hyper + 3)
        w1 = _f64(STEP_TABLE, hyper + 4)
        omb2 = _f64(STEP_TABLE, hyper + 5)
        eps = _f64(STEP_TABLE, hyper + 6)
        # beta ** step (beta in [0, 1); log2(0) = -inf gives 0)
        bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
        step_size = lr / bc1
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(GRAD_SCALE).to(tl.float32)
        length = tl.minimum(numel - start, CHUNK)
        if HAS_INF:
            length = tl.where(tl.load(FOUND_INF) != 0, 0, length)
        n_full = length // BLOCK
        cols = tl.arange(0, BLOCK)
        for i in range(0, n_full):
            offs = start + i * BLOCK + cols
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, has_copy, offs, None, scale, decay, w1, beta2, omb2,
                         eps, step_size, bc2_sqrt, False, COPIES)
        tail = start + n_full * BLOCK
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, has_copy, tail + cols, cols < length - n_full * BLOCK, scale,
                     decay, w1, beta2, omb2, eps, step_size, bc2_sqrt, True, COPIES)

    @triton.jit
    def _adamw_steps_kernel(TENSORS, FOUND_INF, n_tensors, HAS_INF: tl.constexpr, BLOCK: tl.constexpr):
        # every step count += 1, or += 0 with found_inf (one program: a few hundred scalars)
        inc = 1.0
        if HAS_INF:
            inc = tl.where(tl.load(FOUND_INF) != 0, 0.0, 1.0)
        idx = tl.arange(0, BLOCK)
        for i0 in range(0, n_tensors, BLOCK):
            ok = i0 + idx < n_tensors
            ptrs = tl.load(TENSORS + (i0 + idx) * 7 + 3, mask=ok, other=0).to(tl.pointer_type(tl.float32),
                                                                                bitcast=True)
            tl.store(ptrs, tl.load(ptrs, mask=ok) + inc, mask=ok)


class _Plan:
    """The cached device tables for one list of parameters and state tensors."""

    def __init__(self, key: tuple, device: torch.device, n_groups: int, chunk: int):
        self.key = key
        rows = torch.tensor(key, dtype=torch.int64)
        self.n_tensors, self.n_groups, self.chunk = len(key), n_groups, chunk
        self.aligned = all(a % 16 == 0 for k in key for a in (*k[:3], k[6]))
        self.has_copies = any(k[6] for k in key)
        counts = (rows[:, 4] + chunk - 1) // chunk
        tensor_idx = torch.repeat_interleave(torch.arange(len(key)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        starts = (torch.arange(len(tensor_idx)) - first) * chunk
        self.n_chunks = len(tensor_idx)
        self.tensors = rows.to(device)
        self.chunks = torch.stack([tensor_idx, starts], 1).contiguous().to(device)
        self.step_table = torch.empty(self.n_tensors + HYPER_COLS * n_groups, dtype=torch.int64, device=device)
        # host side of the step table: two buffers used in turn (an event says when a buffer's copy has run)
        # and one for a graph capture, written once; pinned on CUDA, so the copies are asynchronous
        pinned = device.type == "cuda"
        self.hosts = [torch.empty(self.step_table.numel(), dtype=torch.int64, pin_memory=pinned) for _ in range(3)]
        self.copied: list = [None, None]
        self.turn = 0

    def host_buffer(self, capturing: bool) -> torch.Tensor:
        if capturing:
            return self.hosts[2]
        self.turn ^= 1
        done = self.copied[self.turn]
        if done is not None:
            done.synchronize()  # the copy of two steps ago: long finished, unless the host is two steps ahead
        return self.hosts[self.turn]

    def copied_from(self, capturing: bool) -> None:
        if not capturing and self.step_table.is_cuda:
            event = self.copied[self.turn] = self.copied[self.turn] or torch.cuda.Event()
            event.record()


def _kernel_takes(p: torch.Tensor, state: dict, device: torch.device) -> bool:
    g, step = p.grad, state.get("step")
    return (type(p.data) is torch.Tensor and type(g) is torch.Tensor and p.dtype == torch.float32
            and g.dtype == torch.float32 and g.layout == torch.strided and p.device == device
            and g.device == device and p.is_contiguous() and g.is_contiguous() and g.shape == p.shape
            and state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()
            and step is not None and step.device == device and step.dtype == torch.float32 and step.dim() == 0)


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW(fused=True) whose step runs the Triton multi-tensor kernel (see the module doc).

    chunk_size / block_size / num_warps: the kernel's tiling (instance attributes, not param-group keys, so
    state_dicts stay interchangeable with torch's AdamW)."""

    chunk_size, block_size, num_warps = CHUNK_SIZE, BLOCK_SIZE, NUM_WARPS  # (an unpickled one has no __init__)
    _plan: Optional[_Plan] = None
    kernel_params = 0  # parameters the last step ran through the Triton kernel (tests, benchmarks)
    # compute-dtype copies the step writes too (`tinyllama.kernels.weight_copies.attach_compute_weights`)
    copies = None

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 chunk_size: int = CHUNK_SIZE, block_size: int = BLOCK_SIZE, num_warps: int = NUM_WARPS):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, fused=True)
        if chunk_size % block_size or block_size & (block_size - 1):
            raise ValueError(f"TritonAdamW: block_size {block_size} must be a power of two dividing chunk_size "
                             f"{chunk_size}")
        self.chunk_size, self.block_size, self.num_warps = chunk_size, block_size, num_warps

    def _kernel_device(self) -> Optional[torch.device]:
        if triton is None:
            return None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and (p.is_cuda or _interpreted()):
                    return p.device
        return None

    @torch.no_grad()
    def step(self, closure=None):
        device = self._kernel_device()
        if device is None:
            self.kernel_params = 0
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        key, grads, hyper, lr_tensors, copied = [], [], [], [], []
        copies = self.copies
        for gi, group in enumerate(self.param_groups):
            params, g_list, m_list, v_list, max_list, s_list = [], [], [], [], [], []
            self._init_group(group, params, g_list, m_list, v_list, max_list, s_list)  # lazy state, as torch
            lr, (beta1, beta2) = group["lr"], group["betas"]
            if group["amsgrad"] or group["maximize"] or (torch.is_tensor(lr) and lr.numel() != 1):
                fallback = list(range(len(params)))
                hyper.append((0.0,) * HYPER_COLS)  # never read: no kernel parameter in this group
            else:
                fallback = []
                for i, p in enumerate(params):
                    st = self.state[p]
                    if _kernel_takes(p, st, device):
                        target = copies.target(p) if copies is not None else None
                        if target is not None:
                            copied.append(p)
                        key.append((p.data_ptr(), m_list[i].data_ptr(), v_list[i].data_ptr(), s_list[i].data_ptr(),
                                    p.numel(), gi, 0 if target is None else target.data_ptr()))
                        grads.append(g_list[i].data_ptr())
                    else:
                        fallback.append(i)
                if torch.is_tensor(lr):  # copied into the table on the device (a graph's lr, see the module doc)
                    lr_tensors.append((gi, lr))
                hyper.append((0.0 if torch.is_tensor(lr) else lr, group["weight_decay"], beta1, beta2, 1 - beta1,
                              1 - beta2, group["eps"], 0.0))
            if fallback:  # torch's fused step for what the kernel does not take
                pick = lambda xs: [xs[i] for i in fallback]  # noqa: E731
                _torch_adam(
                    pick(params), pick(g_list), pick(m_list), pick(v_list), max_list and pick(max_list), pick(s_list),
                    amsgrad=group["amsgrad"], has_complex=any(torch.is_complex(params[i]) for i in fallback),
                    beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=group["maximize"], foreach=None, capturable=group["capturable"],
                    differentiable=False, fused=True, grad_scale=grad_scale, found_inf=found_inf,
                    decoupled_weight_decay=True)
                if copies is not None:  # that step writes no copy (and bumps no version counter): cast them here,
                    for p in pick(params):  # in a captured step on every replay too
                        target = copies.target(p)
                        if target is not None:
                            target.copy_(p)
                            copied.append(p)
        self.kernel_params = sum(k[4] for k in key)
        if key:
            copy_like = copies.target(copied[0]) if copied else None
            self._launch(tuple(key), grads, hyper, lr_tensors, device, grad_scale, found_inf, copy_like)
        if copied:  # each of these weights and its copy were written alike (or, found_inf, neither)
            copies.mark_current(copied)
        return loss

    def _launch(self, key: tuple, grads: list[int], hyper: list[tuple], lr_tensors: list, device: torch.device,
                grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                copy_like: Optional[torch.Tensor] = None) -> None:
        plan = self._plan
        if plan is None or plan.key != key or plan.chunk != self.chunk_size or plan.n_groups != len(hyper):
            plan = self._plan = _Plan(key, device, len(self.param_groups), self.chunk_size)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        host = plan.host_buffer(capturing)
        table = host.numpy()
        table[: plan.n_tensors] = grads
        table[plan.n_tensors:].view("float64").reshape(-1, HYPER_COLS)[:] = hyper
        plan.step_table.copy_(host, non_blocking=host.is_pinned())
        plan.copied_from(capturing)
        hyper_rows = plan.step_table[plan.n_tensors:].view(torch.float64).view(-1, HYPER_COLS)
        for gi, lr in lr_tensors:
            hyper_rows[gi, 0].copy_(lr.reshape(()))
        aligned = plan.aligned and all(a % 16 == 0 for a in grads)
        dummy = plan.step_table  # any tensor, for an absent grad_scale / found_inf
        has_inf = found_inf is not None
        _adamw_steps_kernel[(1,)](plan.tensors, found_inf if has_inf else dummy, plan.n_tensors, HAS_INF=has_inf,
                                  BLOCK=STEPS_BLOCK)
        _adamw_kernel[(plan.n_chunks,)](
            plan.tensors, plan.chunks, plan.step_table, grad_scale if grad_scale is not None else dummy,
            found_inf if has_inf else dummy, copy_like if plan.has_copies else dummy, plan.n_tensors,
            HAS_SCALE=grad_scale is not None, HAS_INF=has_inf, ALIGNED=aligned, COPIES=plan.has_copies,
            CHUNK=self.chunk_size, BLOCK=self.block_size, num_warps=self.num_warps, enable_fp_fusion=False)
