"""Run configuration: YAML + overrides, recipes, validation errors; the optimizer and its LR curve."""

from __future__ import annotations


import pytest

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.model import Llama
from tinyllama.train.config import (
    list_recipes,
    load_run_config,
    resolve_config_path,
)
from tinyllama.train.optim import OptimConfig, build_optimizer, lr_at


def test_recipe_1p1b_is_tinyllamas_recipe():
    cfg = load_run_config("recipes/tinyllama-1.1b.yaml")
    o, t, d = cfg.optim, cfg.train, cfg.data
    assert (o.lr, o.min_lr, o.warmup_steps, o.betas, o.weight_decay, o.grad_clip) == (
        4e-4, 4e-5, 2000, (0.9, 0.95), 0.1, 1.0)
    assert t.global_batch == 1024 and d.seq_len == 2048 and t.max_tokens == 3 * 10**12
    assert d.sources == "slimpajama:0.7,starcoder:0.3"
    assert cfg.model_config().num_params() == 1_100_048_384
    # gradient accumulation derives from the world size
    assert t.grad_accum(1) == 128 and t.grad_accum(8) == 16 and t.grad_accum(128) == 1
    with pytest.raises(TinyLlamaError, match="multiple of micro_batch × world size"):
        t.grad_accum(3)


def test_all_packaged_recipes_load():
    names = list_recipes()
    assert {"demo", "tinyllama-1.1b", "tinyllama-120m", "tinyllama-v1.1-stage1", "tinyllama-v1.1-stage2",
            "tinyllama-v1.1-stage3"} <= set(names)
    for n in names:
        cfg = load_run_config(n)
        cfg.validate()
    s1, s2, s3 = (load_run_config(f"tinyllama-v1.1-stage{i}") for i in (1, 2, 3))
    assert s2.train.init_from == s1.train.out_dir and s3.train.init_from == s2.train.out_dir
    assert s3.train.global_batch == 4 * s1.train.global_batch and s3.train.lr_step_scale == 4
    # The three stages tile one LR curve exactly.
    assert s2.train.lr_step_offset == s1.train.max_steps
    assert s3.train.lr_step_offset == s1.train.max_steps + s2.train.max_steps
    assert s3.train.lr_step_offset + 4 * s3.train.max_steps == pytest.approx(s1.optim.max_steps, abs=2)
    assert s2.data.ramp_to and s2.data.ramp_blocks > 0


def test_overrides_typed_and_nested():
    cfg = load_run_config("demo", ["--optim.lr", "3e-4", "--train.max_steps=7", "--model.n_layers", "2",
                                   "--train.compile", "true", "--optim.betas", "[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.train.compile is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model_config().n_layers == 2 and cfg.model_config().hidden_size == 192


@pytest.mark.parametrize("overrides, message", [
    (["--optim.lrr", "1"], "unknown field"),
    (["--train.micro_batch", "abc"], "micro_batch"),
    (["--foo.bar", "1"], "unknown section 'foo'"),
    (["--train.max_steps"], "has no value"),
    (["stray"], "unrecognised argument"),
    (["--train.nonfinite_policy", "ignore"], "nonfinite_policy"),
    (["--model.preset", "nope"], "unknown"),
    (["--data.seq_len", "4096"], "exceeds the model's max_seq_len"),
    (["--train.global_batch", "10", "--train.micro_batch", "4"], "multiple of train.micro_batch"),
])
def test_bad_overrides_give_one_line_errors(overrides, message):
    with pytest.raises(TinyLlamaError, match=message) as e:
        load_run_config("demo", overrides).validate()
    assert "\n" not in str(e.value)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(TinyLlamaError, match="config file not found"):
        resolve_config_path(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(TinyLlamaError, match="not valid YAML"):
        load_run_config(str(bad))
    bad.write_text("trian: {}\n")
    with pytest.raises(TinyLlamaError, match="unknown section"):
        load_run_config(str(bad))


def test_lr_curve_warmup_then_cosine_to_min():
    c = OptimConfig(lr=4e-4, min_lr=4e-5, warmup_steps=100, max_steps=1100)
    assert lr_at(0, c) == pytest.approx(4e-6)
    assert lr_at(99, c) == pytest.approx(4e-4)
    assert lr_at(600, c) == pytest.approx((4e-4 + 4e-5) / 2)
    assert lr_at(1100, c) == pytest.approx(4e-5) and lr_at(5000, c) == pytest.approx(4e-5)
    lrs = [lr_at(s, c) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_on_matrices_only():
    model = Llama(ModelConfig.from_name("tinyllama-tiny"))
    opt = build_optimizer(model, OptimConfig(max_steps=10))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters() if "norm" in n}
    assert any(names[id(p)] == "embed_tokens.weight" for p in decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("value", ["none", "None", "null", "false", "", "off"])
def test_export_hf_none_turns_the_export_off(value):
    from tinyllama.finetune.trainer import load_finetune_config

    # was a directory named after the word ('none', 'None', ...) or a type error (false)
    assert load_run_config("demo", ["--train.export_hf", value]).train.export_hf is None
    ft = load_finetune_config("sft", None, ["--train.export_hf", value], **{"model.path": "m", "data.train": "d.jsonl"})
    assert ft.train.export_hf is None
    assert load_run_config("demo").train.export_hf == "hf"  # the demo recipe's
    assert load_finetune_config("dpo", None, [], **{"model.path": "m", "data.train": "d.jsonl"}).train.export_hf == "hf"
