"""Weight-only quantization: per-layer error bounds, kernel vs dequantized reference, whole-model behaviour."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tinyllama import Llama, ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.generate import generate, generate_batch, SamplingConfig
from tinyllama.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_model, weight_bytes




SMALL = ModelConfig(name="q-test", vocab_size=512, n_layers=2, hidden_size=128, n_heads=4, n_kv_heads=2,
                    intermediate_size=352, max_seq_len=128)


def test_int8_roundtrip_error_is_half_a_step():
    w = torch.randn(64, 96)
    lin = Int8Linear(w, torch.float32)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((lin.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(5, 3, 96)
    y = lin(x)
    assert y.shape == (5, 3, 64)
    torch.testing.assert_close(y, F.linear(x, lin.dequantize()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", [32, 128])
def test_int4_roundtrip_and_kernel_match_dequantized(group):
    w = torch.randn(48, 256)
    lin = Int4Linear(w, group, torch.float32)
    q, scales, zeros = quantize_int4(w, group)
    assert q.max() <= 15 and scales.shape == (48, 256 // group)
    step = scales.repeat_interleave(group, dim=1)
    assert ((lin.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    x = torch.randn(7, 256)
    ref = F.linear(x, lin.dequantize())
    torch.testing.assert_close(lin(x), ref, atol=1e-3, rtol=1e-3)
    assert lin.kernel == "cpu"  # the fused CPU kernel is used when it reproduces the reference


def test_int4_pads_odd_widths():
    w = torch.randn(16, 176)  # 176 is not a multiple of 32 or 128
    for group in (32, 128):
        lin = Int4Linear(w, group, torch.float32)
        assert lin.kernel is None
        x = torch.randn(2, 176)
        torch.testing.assert_close(lin(x), F.linear(x, lin.dequantize()), atol=1e-4, rtol=1e-4)
        assert (lin.dequantize() - w).abs().max() < 0.25 * w.abs().max()


@pytest.mark.parametrize("scheme,group,tol", [("int8", 128, 0.02), ("int4", 32, 0.3), ("int4", 128, 0.4)])
def test_quantized_model_tracks_full_precision(scheme, group, tol):
    torch.manual_seed(1)
    model = Llama(SMALL).eval()
    ids = torch.randint(0, SMALL.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(ids)
        q = quantize_model(copy.deepcopy(model), scheme, group)
        out = q(ids)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    assert weight_bytes(q) < weight_bytes(model) * (0.45 if scheme == "int8" else 0.35) + 4 * SMALL.vocab_size * 128
    # generation (static cache, batching) runs on the quantized model; int8 keeps greedy choices of a sharp model
    outs = generate_batch(q, [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    assert [len(o) for o in outs] == [8, 8]


def test_int8_greedy_matches_full_precision_on_sharp_model():
    torch.manual_seed(2)
    model = Llama(SMALL).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    full = generate(model, [1, 9, 27], max_new_tokens=20, stop_at_eos=False)
    q = quantize_model(copy.deepcopy(model), "int8")
    assert generate(q, [1, 9, 27], max_new_tokens=20, stop_at_eos=False) == full


def test_bad_scheme_and_group_raise():
    model = Llama(SMALL)
    with pytest.raises(TinyLlamaError, match="scheme"):
        quantize_model(model, "int3")
    with pytest.raises(TinyLlamaError, match="group_size"):
        quantize_model(model, "int4", group_size=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_reference():
    w = torch.randn(256, 2048, device="cuda")
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    for lin in (Int8Linear(w.bfloat16(), torch.bfloat16), Int4Linear(w.bfloat16(), 128, torch.bfloat16)):
        ref = F.linear(x.float(), lin.dequantize().float())
        torch.testing.assert_close(lin(x).float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
