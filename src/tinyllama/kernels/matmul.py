"""Weight gradients straight from the GEMM in the weight's dtype: the fused block's projections and the fused
cross-entropy's head.

bf16 operands and an fp32 weight: cuBLAS writes (or, accumulating, adds into) the fp32 gradient itself, so
there is no bf16 rounding of the product and no separate cast or add pass over the gradient."""

from __future__ import annotations

from typing import Optional

import torch

# (op, device) -> whether torch.mm / torch.addmm(bf16, bf16, out_dtype=torch.float32) runs there
_OUT_DTYPE: dict = {}


def _writes_fp32(op: str, device: torch.device) -> bool:
    """Probed once per device on tiny matrices (so that no out-of-memory error is taken for 'unsupported')."""
    key = (op, device)
    if key not in _OUT_DTYPE:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        try:
            if op == "mm":
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            else:
                c = torch.zeros(16, 16, dtype=torch.float32, device=device)
                ok = torch.equal(torch.addmm(c, a, a, out_dtype=torch.float32, out=c), torch.full_like(c, 16.0))
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _OUT_DTYPE[key] = ok
    return _OUT_DTYPE[key]


def weight_grad(dy: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dy^T @ x for rows dy (N, M), x (N, K): a weight's gradient (M, K) in `dtype`, accumulated in fp32;
    with `accumulate` (an (M, K) tensor of `dtype`), added into it in place and returned."""
    if accumulate is not None:
        if (dy.is_cuda and dtype == torch.float32 and dy.dtype == torch.bfloat16 and accumulate.is_contiguous()
                and _writes_fp32("addmm", dy.device)):
            return torch.addmm(accumulate, dy.t(), x, out_dtype=torch.float32, out=accumulate)
        return accumulate.add_(weight_grad(dy, x, dtype))
    if dtype == dy.dtype:
        return torch.mm(dy.t(), x)
    if dy.is_cuda:
        if dtype == torch.float32 and dy.dtype == torch.bfloat16 and _writes_fp32("mm", dy.device):
            return torch.mm(dy.t(), x, out_dtype=torch.float32)
        return torch.mm(dy.t(), x).to(dtype)
    return torch.mm(dy.t().to(dtype), x.to(dtype))  # CPU: the fp32 accumulation the GPU path has
