import json

import pytest
import torch

from tinyllama import Llama, ModelConfig, TinyLlamaError


def test_tinyllama_1_1b_param_count_on_meta():
    cfg = ModelConfig.from_name("tinyllama-1.1b")
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.lm_head.weight.is_meta  # nothing allocated
    assert model.num_params() == 1_100_048_384
    assert cfg.num_params() == 1_100_048_384
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (22, 2048, 32, 4, 64)
    assert (cfg.intermediate_size, cfg.max_seq_len, cfg.vocab_size) == (5632, 2048, 32000)
    assert abs(cfg.flops_per_token(2048) / 1e9 - 7.31) < 0.01


@pytest.mark.parametrize("name", ["tinyllama-120m", "tinyllama-demo", "tinyllama-tiny"])
def test_presets_count_matches_module(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == cfg.num_params()


def test_small_presets_sizes():
    assert ModelConfig.from_name("tinyllama-120m").n_kv_heads == 1
    for name in ("tinyllama-tiny", "tinyllama-demo"):
        n = ModelConfig.from_name(name).num_params()
        assert 1e6 <= n <= 20e6, (name, n)


def test_hf_config_round_trip(tmp_path):
    cfg = ModelConfig.from_name("tinyllama-tiny")
    d = cfg.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = ModelConfig.from_json(tmp_path / "config.json")
    assert back.replace(name=cfg.name) == cfg


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=100, n_heads=3), "hidden_size"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_inconsistent_config_names_field(changes, field):
    with pytest.raises(TinyLlamaError, match=field):
        ModelConfig.from_name("tinyllama-tiny", **changes)


def test_unknown_preset():
    with pytest.raises(TinyLlamaError, match="unknown model preset 'llama-7b'"):
        ModelConfig.from_name("llama-7b")


def test_hf_config_rejects_other_architectures(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(TinyLlamaError, match="model_type is 'gpt2'"):
        ModelConfig.from_json(p)
    d = ModelConfig.from_name("tinyllama-tiny").to_hf_dict()
    del d["num_hidden_layers"]
    p.write_text(json.dumps(d))
    with pytest.raises(TinyLlamaError, match="num_hidden_layers"):
        ModelConfig.from_json(p)
