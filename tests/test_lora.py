"""tinyllama.finetune.lora: only adapters train; merged weights give base + adapter logits, also over int8/int4."""

from __future__ import annotations

import pytest
import torch

from tinyllama.config import ModelConfig
from tinyllama.finetune.lora import (LoRALinear, adapters_disabled, apply_lora, load_adapter, lora_parameters,
                                     merge_lora, save_adapter, LoRAConfig)
from tinyllama.model import Llama
from tinyllama.train.optim import OptimConfig, build_optimizer



CFG = ModelConfig.from_name("tinyllama-tiny")


def _model() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG).eval()


def _randomise_adapters(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("quant,targets", [(None, None), ("int8", ("q_proj", "v_proj")), ("int4", None)])
def test_lora_training_changes_only_adapter_weights(quant, targets):
    model = _model()
    if quant:
        from tinyllama.quantize import quantize_model

        quantize_model(model, quant, 32, skip=("lm_head",))
    names = apply_lora(model, r=4, alpha=8, dropout=0.1, **({"targets": targets} if targets else {}))
    assert len(names) == (len(targets) if targets else 7) * CFG.n_layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0, max_steps=3))
    model.train()
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    for _ in range(3):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed == adapters
    # Every adapter learned, including those in the first layer (gradients pass through the quantized layers above).
    assert {k.rsplit(".", 2)[0] for k in changed if ".lora_A." in k} == {k.rsplit(".", 2)[0] for k in adapters if ".lora_A." in k}


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_merged_logits_equal_base_plus_adapter(quant, tmp_path):
    model = _model()
    if quant:
        from tinyllama.quantize import quantize_model

        quantize_model(model, quant, 32, skip=("lm_head",))
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    _randomise_adapters(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        with adapters_disabled(model):
            base_logits = model(ids)
        lora_logits = model(ids)
    assert (lora_logits - base_logits).abs().max() > 1e-3  # the adapter matters

    save_adapter(model, tmp_path / "adapter", LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(isinstance(m, torch.nn.Linear) for n, m in merged.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        merged_logits = merged(ids)
    torch.testing.assert_close(merged_logits, lora_logits, atol=2e-4, rtol=1e-4)

    # Exported to Hugging Face format, transformers computes the same logits.
    transformers = pytest.importorskip("transformers")
    merged.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lora_logits, atol=2e-4, rtol=1e-4)

    # The saved adapter reloads onto a fresh base and gives the same logits again.
    fresh = _model()
    if quant:
        from tinyllama.quantize import quantize_model

        quantize_model(fresh, quant, 32, skip=("lm_head",))
    apply_lora(fresh, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), lora_logits, atol=1e-5, rtol=1e-5)


def test_adapter_files_get_the_umask_mode(tmp_path):
    import os
    import stat

    model = _model()
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    old = os.umask(0o027)
    try:
        save_adapter(model, tmp_path / "adapter", LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "adapter").iterdir()}
    assert modes == {"adapter_model.safetensors": 0o640, "adapter_config.json": 0o640}  # not mkstemp's 0600


def test_adapter_loads_in_peft_when_installed(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _model()
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0), str(tmp_path / "base"))
    ids = torch.randint(0, CFG.vocab_size, (1, 10))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, model(ids), atol=2e-4, rtol=1e-4)
