"""Fused output head + cross-entropy that never materialises the logits of the whole batch.

The rows are processed in chunks: for each chunk the logits are computed, turned into the loss and
the gradient of the logits at once (softmax − one-hot), and immediately multiplied back into the
gradients of the hidden states and the head weight. Only one chunk's logits exist at a time, so a
micro-batch of 16 k tokens needs ~0.3 GB here instead of ~4 GB for fp32 logits and their gradient.
The gradients are computed in the forward pass (as Liger's FusedLinearCrossEntropy does) and only
scaled by the incoming gradient in backward, so nothing is recomputed.

Semantics match `F.cross_entropy(x @ weight.T, targets, ignore_index=-100)` (mean over the
non-ignored targets); if every target is ignored the loss is 0 rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyllama.kernels.matmul import weight_grad

IGNORE_INDEX = -100


def reference_linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Plain PyTorch reference: full logits, then F.cross_entropy in fp32 (the model's unfused path)."""
    logits = x.reshape(-1, x.size(-1)) @ weight.t()
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)


def ce_chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, inv_count: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one chunk of logits (rows, vocab): summed loss of the valid rows, and d(mean loss)/d(logits).

    Written as pure tensor ops so `torch.compile` can fuse it into one reduction and one pointwise pass.
    """
    lf = logits if logits.dtype == torch.float64 else logits.float()
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(lf, dim=-1)
    target_logit = lf.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    loss_sum = torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
    cols = torch.arange(lf.size(1), device=lf.device)
    probs = torch.exp(lf - lse.unsqueeze(1))
    grad = torch.where(cols.unsqueeze(0) == safe_t.unsqueeze(1), probs - 1.0, probs)
    row_scale = torch.where(valid, inv_count, torch.zeros_like(inv_count))
    grad = (grad * row_scale.unsqueeze(1)).to(logits.dtype)
    return loss_sum, grad


_compiled_chunk_fn = None


def _chunk_fn(device: torch.device, use_compile: bool):
    """The compiled chunk function on CUDA (one fused reduction + pointwise), eager elsewhere."""
    global _compiled_chunk_fn
    if not use_compile or device.type != "cuda":
        return ce_chunk_loss_and_grad
    if _compiled_chunk_fn is None:
        _compiled_chunk_fn = torch.compile(ce_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk_fn


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_rows, compute_dtype, use_compile):
        n, _ = x.shape
        device = x.device
        need_x_grad, need_w_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Autocast would cast the fp32 gradient accumulator of the weight down to bf16: we do the casts here.
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute_dtype)
            count = (targets != ignore_index).sum()
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)
            inv_count = 1.0 / count.clamp(min=1).to(acc_dtype)
            loss = torch.zeros((), dtype=acc_dtype, device=device)
            grad_x = torch.empty_like(x) if need_x_grad else None
            grad_w = None  # the first chunk's product, then each chunk added by the GEMM itself (fp32, no add pass)
            fn = _chunk_fn(device, use_compile)
            for start in range(0, n, chunk_rows):
                end = min(start + chunk_rows, n)
                xc = x[start:end].to(compute_dtype)
                logits = xc @ w.t()
                loss_c, g = fn(logits, targets[start:end], inv_count, ignore_index)
                loss += loss_c
                del logits
                if need_x_grad and grad_x.dtype == g.dtype:  # into the row slice (contiguous): no copy pass
                    torch.mm(g, w, out=grad_x[start:end])
                elif need_x_grad:  # e.g. fp32 rows under autocast: the product cast on the way in
                    grad_x[start:end] = g @ w
                if need_w_grad:
                    grad_w = weight_grad(g, xc, acc_dtype, accumulate=grad_w)
            loss = loss * inv_count
            if need_w_grad and grad_w is None:  # no rows
                grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=device)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if need_w_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_loss.to(grad_x.dtype) if grad_x is not None else None
        gw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return gx, gw, None, None, None, None, None


def default_chunk_rows(n_rows: int, vocab_size: int, budget_bytes: int = 512 * 1024**2) -> int:
    """Rows per chunk so one chunk's fp32 logits stay under ~budget_bytes (the bf16 copy and grad add ~1×)."""
    max_rows = max(1, budget_bytes // (4 * vocab_size))
    n_chunks = -(-n_rows // max_rows)
    return max(1, -(-n_rows // n_chunks))  # equal chunks: one compiled shape, no ragged tail


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
    use_compile: bool = True,
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` against `targets`, computed chunk-wise (see module doc).

    x: (..., hidden); weight: (vocab, hidden); targets: (...) int64 with `ignore_index` for no target.
    Under autocast the products run in the autocast dtype, the softmax in fp32, like the unfused path.
    """
    hidden = x.size(-1)
    x2 = x.reshape(-1, hidden)
    t2 = targets.reshape(-1)
    if t2.numel() != x2.size(0):
        raise ValueError(f"targets have {t2.numel()} elements but x has {x2.size(0)} rows")
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    rows = chunk_rows or default_chunk_rows(x2.size(0), weight.size(0))
    return _LinearCrossEntropy.apply(x2, weight, t2, ignore_index, int(rows), compute_dtype, use_compile)


class LinearCrossEntropyLoss:
    """Callable for `Llama.loss_fn`: (hidden after final norm, lm_head.weight, targets) -> mean loss."""

    def __init__(self, chunk_rows: int | None = None, use_compile: bool = True, ignore_index: int = IGNORE_INDEX):
        self.chunk_rows = chunk_rows
        self.use_compile = use_compile
        self.ignore_index = ignore_index

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(x, weight, targets, self.ignore_index, self.chunk_rows, self.use_compile)

    def __repr__(self) -> str:
        return f"LinearCrossEntropyLoss(chunk_rows={self.chunk_rows}, use_compile={self.use_compile})"
