"""Weight-only quantization of a model's linear layers: int8 per output channel, int4 group-wise.

- int8: symmetric, one scale per output row: w ≈ q · s, q in [-127, 127].
- int4: asymmetric per group of `group_size` input columns (32 or 128), as in gpt-fast / torchao:
  w ≈ (q - 8) · scale + zero, q in [0, 15].

Activations stay in the model's dtype. Matrix products use PyTorch's fused weight-only kernels where the
device and shapes allow (`_weight_int8pack_mm`; `_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu`
on CPU); each kernel is checked once against the dequantized reference when the layer is built, and
otherwise the weight is dequantized on the fly (always correct, any shape).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyllama.errors import TinyLlamaError

SCHEMES = ("int8", "int4")
KERNEL_MAX_ROWS = 64  # CPU: above this many activation rows, dequantize once and use the dense product
GROUP_SIZES = (32, 64, 128, 256)


# ---- int8 ---------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, k) float -> (q int8 (n, k), scales fp32 (n,))."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_int8(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(dtype))
        # CPU: the fused aten kernel. CUDA: dequantize-in-the-product, which torch.compile fuses into one
        # GEMV; the aten int8 kernel measured ~10x slower than bf16 there (BENCHMARKS.md).
        self.use_kernel = weight.device.type == "cpu" and _int8_kernel_ok("cpu", dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.use_kernel and x.dtype == self.scales.dtype and rows <= KERNEL_MAX_ROWS:
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
            return y.view(*shape[:-1], self.out_features)
        # Dequantize-on-the-fly; under torch.compile the scale multiply fuses into the product's epilogue.
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, kernel={self.use_kernel}"


@functools.lru_cache(maxsize=None)
def _int8_kernel_ok(device_type: str, dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(3, 64, device=device_type, dtype=dtype)
        w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device=device_type)
        s = torch.rand(32, device=device_type, dtype=dtype) / 64
        y = torch._weight_int8pack_mm(x, w, s)
        ref = F.linear(x.float(), w.float()) * s.float()
        return bool(torch.allclose(y.float(), ref, atol=3e-2, rtol=3e-2))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


# ---- int4 ---------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (n, k) -> (q uint8 (n, k_pad) in [0, 15], scales (n, k_pad/g), zeros (n, k_pad/g)), fp32 qparams.

    k is zero-padded up to a multiple of group_size; padded columns dequantize to ~0 and are sliced off.
    """
    n, k = w.shape
    k_pad = -(-k // group_size) * group_size
    w = F.pad(w.float(), (0, k_pad - k))
    g = w.view(n, k_pad // group_size, group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    q = torch.round((g - lo) / scales).clamp(0, 15).to(torch.uint8).view(n, k_pad)
    zeros = lo + 8 * scales
    return q, scales.squeeze(-1), zeros.squeeze(-1)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    n, k_pad = q.shape
    g = q.view(n, k_pad // group_size, group_size).to(dtype)
    return ((g - 8) * scales[..., None].to(dtype) + zeros[..., None].to(dtype)).view(n, k_pad)


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise TinyLlamaError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.dtype = dtype
        q, scales, zeros = quantize_int4(weight, group_size)
        device = weight.device
        # Portable form: two 4-bit values per byte (even column in the high nibble).
        self.register_buffer("packed", (q[:, ::2] << 4 | q[:, 1::2]).contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("zeros", zeros.to(dtype))
        self.kernel: Optional[str] = None
        self.register_buffer("kernel_weight", None)
        self.register_buffer("scales_and_zeros", None)
        self._try_kernel(q, device)

    def _try_kernel(self, q: torch.Tensor, device: torch.device) -> None:
        n, k = self.out_features, self.in_features
        if k % self.group_size:
            return
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()  # (k/g, n, 2)
        try:
            if device.type == "cuda":
                if self.dtype != torch.bfloat16 or k % 1024 or n % 8:
                    return  # the tensor-core kernel wants bf16 and k a multiple of inner_k_tiles(8)·128
                kw = torch.ops.aten._convert_weight_to_int4pack(self.packed, 8)
                name = "cuda"
            elif device.type == "cpu":
                kw = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                name = "cpu"
            else:
                return
        except (RuntimeError, NotImplementedError, AttributeError):
            return
        self.kernel_weight, self.scales_and_zeros, self.kernel = kw, sz, name
        # Trust the kernel only if it reproduces the dequantized product on this layer.
        x = torch.randn(4, k, device=device, dtype=self.dtype, generator=torch.Generator(device).manual_seed(0))
        try:
            got = self._kernel_mm(x).float()
        except (RuntimeError, NotImplementedError):
            got = None
        ref = F.linear(x.float(), self.dequantize().float())
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        if got is None or not torch.allclose(got, ref, atol=tol * ref.abs().max().item(), rtol=tol):
            self.kernel_weight = self.scales_and_zeros = self.kernel = None

    def _kernel_mm(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2d, self.kernel_weight, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.kernel_weight, self.group_size,
                                                           self.scales_and_zeros)

    def dequantize(self) -> torch.Tensor:
        n = self.out_features
        q = torch.stack([self.packed >> 4, self.packed & 0xF], dim=-1).view(n, -1)
        return dequantize_int4(q, self.scales, self.zeros, self.group_size, self.dtype)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        # The fused kernels are built for decode (few rows); a prefill or scoring pass of many rows is faster
        # as one dequantization plus a dense product.
        if self.kernel is not None and x.dtype == self.dtype and (rows <= KERNEL_MAX_ROWS or self.kernel == "cuda"):
            shape = x.shape
            y = self._kernel_mm(x.reshape(-1, shape[-1]).contiguous())
            return y.view(*shape[:-1], self.out_features)
        return F.linear(x, self.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, "
                f"kernel={self.kernel}")


# ---- model-level --------------------------------------------------------------------------------
@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int = 128,
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear (output head included) by its weight-only quantized form, in place.

    The activation/compute dtype is the layer's current weight dtype; move the model to its device and dtype
    first. Returns the model.
    """
    if scheme not in SCHEMES:
        raise TinyLlamaError(f"unknown quantization scheme '{scheme}'; choose one of: {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise TinyLlamaError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not any(name.endswith(s) for s in skip)]
    if not targets:
        raise TinyLlamaError("quantize_model: the model has no nn.Linear layers left to quantize")
    for name, lin in targets:
        if lin.bias is not None:
            raise TinyLlamaError(f"quantize_model: layer '{name}' has a bias; only bias-free (Llama) layers are supported")
        w = lin.weight.detach()
        new = Int8Linear(w, w.dtype) if scheme == "int8" else Int4Linear(w, group_size, w.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    # Keep code that reads `model.lm_head.weight.device/dtype` (generation) working.
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and quantized weight buffers (what a decode step reads)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers()
                                         if not n.endswith(("rope_cos", "rope_sin", "causal_mask", ".k", ".v",
                                                            "kernel_weight", "scales_and_zeros"))]:
        if id(t) not in seen and t is not None:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
