"""tinyllama.finetune: chat data, SFT, DPO (tiny model, a few steps on CPU)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.finetune.chat_data import (IGNORE, pack_examples, read_chat_jsonl, read_preference_jsonl, render_chat,
                                          tokenize_conversations)
from tinyllama.finetune.trainer import finetune, load_finetune_config
from tinyllama.model import Llama
from tinyllama.tokenizer import Tokenizer



COLORS = ["red", "blue", "green", "yellow"]
SEQ = 96


def _conv(rnd: random.Random, i: int) -> list[dict]:
    c, n = rnd.choice(COLORS), rnd.randint(1, 9)
    msgs = [{"role": "user", "content": f"What is {n} plus one, and name a {c} thing?"},
            {"role": "assistant", "content": f"{n} plus one is {n + 1}. A {c} thing is a {c} ball."}]
    if i % 3 == 0:
        msgs = [{"role": "system", "content": "You are helpful."}] + msgs + [
            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    return msgs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    Llama(ModelConfig.from_name("tinyllama-tiny")).save_pretrained(d / "base")
    rnd = random.Random(0)
    for name, n in (("train", 32), ("val", 8)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"messages": _conv(rnd, i)}) + "\n" for i in range(n)))
    prefs = []
    for i in range(16):
        c = COLORS[i % 4]
        prefs.append({"prompt": f"Name a {c} thing.", "chosen": f"A {c} ball.", "rejected": "I do not know."})
    # the UltraFeedback-binarized layout: full message lists
    prefs.append({"prompt": "Say hi.", "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
                  "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}]})
    (d / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    return {"dir": d, "base": d / "base", "train": d / "train.jsonl", "val": d / "val.jsonl", "prefs": d / "prefs.jsonl"}


def _cfg(kind: str, files: dict, out: Path, **kw):
    direct = {"model.path": str(files["base"]), "data.train": str(files["train" if kind == "sft" else "prefs"]),
              "train.out_dir": str(out), "data.seq_len": SEQ, "train.micro_batch": 2, "train.global_batch": 4,
              "train.progress": False, "train.export_hf": None, "optim.lr": 3e-3, "optim.warmup_steps": 0,
              "train.dtype": "float32"}  # fp32 on every CPU (auto is bf16 where the CPU has it): exact comparisons
    direct.update(kw)
    return load_finetune_config(kind, None, [], **direct)


# ---- data --------------------------------------------------------------------------------------------
def test_render_chat_masks_exactly_the_assistant_turns():
    tok = Tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine."},
            {"role": "assistant", "content": "Good."}]
    ids, mask = render_chat(tok, msgs)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == "Hello! How are you?</s>Good.</s>"
    ids_last, mask_last = render_chat(tok, msgs, train_on="last")
    assert tok.decode([i for i, m in zip(ids_last, mask_last) if m], skip_special_tokens=False) == "Good.</s>"


def test_packing_keeps_conversations_whole_and_ignores_non_assistant_targets(files):
    tok = Tokenizer()
    convs = read_chat_jsonl(files["train"])
    ex, truncated = tokenize_conversations(tok, convs, SEQ)
    assert truncated == 0
    blocks = pack_examples(ex, SEQ, tok.eos_id, packing=True)
    unpacked = pack_examples(ex, SEQ, tok.eos_id, packing=False)
    assert blocks.shape[1:] == (2, SEQ) and len(blocks) < len(unpacked) == len(ex)
    # Every assistant token of every conversation is a target exactly once, and nothing else is.
    n_trained = sum(sum(e.mask[1:]) for e in ex)
    assert int((blocks[:, 1] != IGNORE).sum()) == n_trained == int((unpacked[:, 1] != IGNORE).sum())
    # Conversations start on a BOS at a block position, never cut across blocks.
    starts = (blocks[:, 0] == tok.bos_id).sum()
    assert int(starts) == len(ex)


@pytest.mark.parametrize("line,msg", [
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'robot'"),
    ({"messages": []}, "empty conversation"),
    ({"conversation": []}, "missing field 'messages'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, r"messages\[0\] is missing field 'content'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
])
def test_bad_chat_lines_are_named(tmp_path, line, msg):
    p = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    p.write_text(good + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(TinyLlamaError, match=rf"chat\.jsonl:3: .*{msg}"):
        read_chat_jsonl(p)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_and_sharegpt_files_read_as_messages(tmp_path):
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add one.", "input": "41", "output": "42"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
        {"instruction": "Name a colour.", "output": "Red."},  # "input" is optional
    ])
    assert read_chat_jsonl(alpaca) == [
        [{"role": "user", "content": "Add one.\n\n41"}, {"role": "assistant", "content": "42"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
         {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
    ]
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "a", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                      {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                                      {"from": "gpt", "value": "A2"}]},
        {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]},
    ])
    assert read_chat_jsonl(sharegpt) == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]


ALPACA = {"instruction": "a", "output": "b"}
SHAREGPT = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
MESSAGES = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("first,line,msg", [
    (ALPACA, MESSAGES, r"a messages record in a file of Alpaca records \(line 1 is one\)"),
    (MESSAGES, SHAREGPT, r"a ShareGPT record in a file of messages records \(line 1 is one\)"),
    (SHAREGPT, ALPACA, r"a Alpaca record in a file of ShareGPT records"),
    (ALPACA, {"instruction": "a"}, "missing field 'output'"),
    (ALPACA, {"instruction": " ", "output": "b"}, "field 'instruction' is empty"),
    (ALPACA, {"instruction": "a", "input": 3, "output": "b"}, "field 'input' must be a string, got int"),
    (ALPACA, {"output": "b"}, "missing field 'instruction'"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "a"}, {"from": "bing", "value": "b"}]},
     r"conversations\[1\] has unknown role 'bing'"),
    (SHAREGPT, {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
     r"conversations\[0\] is missing field 'value'"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}]},
     r"conversations\[0\] field 'value' must be a string"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "a"}]}, "no assistant message"),
    (SHAREGPT, {"conversations": []}, "empty conversation"),
    (SHAREGPT, {"conversations": "hi"}, "field 'conversations' must be a list"),
])
def test_bad_alpaca_and_sharegpt_lines_are_named(tmp_path, first, line, msg):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(first) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(TinyLlamaError, match=rf"chat\.jsonl:3: .*{msg}"):
        read_chat_jsonl(p)


def test_a_file_of_no_known_shape_names_all_shapes(tmp_path):
    p = _jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(TinyLlamaError, match=r"chat\.jsonl:1: missing field 'messages' \(or Alpaca's 'instruction'"):
        read_chat_jsonl(p)


def test_bad_preference_lines_are_named(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(TinyLlamaError, match=r"prefs\.jsonl:1: missing field 'rejected'"):
        read_preference_jsonl(p)


def test_cli_reports_bad_data_in_one_line(files, tmp_path, capsys):
    from tinyllama.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}) + "\n")
    rc = main(["sft", "--model", str(files["base"]), "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "bad.jsonl:1" in err and "unknown role 'bot'" in err


# ---- SFT -------------------------------------------------------------------------------------------
def heldout_assistant_loss(model_dir: Path, val: Path) -> float:
    tok = Tokenizer(model_dir)
    model = Llama.from_pretrained(model_dir).eval()
    ex, _ = tokenize_conversations(tok, read_chat_jsonl(val), SEQ)
    blocks = pack_examples(ex, SEQ, tok.eos_id, packing=False).long()
    with torch.no_grad():
        logits = model(blocks[:, 0])
    return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), blocks[:, 1].reshape(-1), ignore_index=IGNORE))


def test_sft_lowers_heldout_assistant_loss(files, tmp_path):
    before = heldout_assistant_loss(files["base"], files["val"])
    cfg = _cfg("sft", files, tmp_path / "sft", **{"data.val": str(files["val"]), "train.max_steps": 8,
                                                  "train.export_hf": "hf"})
    r = finetune(cfg)
    after = heldout_assistant_loss(Path(r["hf_dir"]), files["val"])
    assert after == pytest.approx(r["val_loss"], rel=1e-4)  # the exported model is the trained one
    assert after < before - 1.0, (before, after)


def test_sft_runs_on_an_alpaca_file(files, tmp_path):
    """The Alpaca rows train the same conversations as their messages rows: the same losses, step by step."""
    rnd = random.Random(1)
    convs = [_conv(rnd, i)[-2:] for i in range(8)]  # one user turn, one reply each
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": c[0]["content"], "output": c[1]["content"]}
                                                 for c in convs])
    messages = _jsonl(tmp_path / "messages.jsonl", [{"messages": c} for c in convs])
    steps = {"train.max_steps": 3}
    a = finetune(_cfg("sft", files, tmp_path / "a", **{**steps, "data.train": str(alpaca)}))
    m = finetune(_cfg("sft", files, tmp_path / "m", **{**steps, "data.train": str(messages)}))
    assert len(a["losses"]) == 3 and all(math.isfinite(x) for x in a["losses"])
    assert a["losses"] == m["losses"]


def test_sft_resume_is_exact(files, tmp_path):
    common = {"train.max_steps": 4, "optim.max_steps": 4, "lora.enabled": True, "lora.dropout": 0.1}
    straight = finetune(_cfg("sft", files, tmp_path / "a", **common))
    first = finetune(_cfg("sft", files, tmp_path / "b", **{**common, "train.max_steps": 2}))
    resumed = finetune(_cfg("sft", files, tmp_path / "b", **common), resume=True)
    assert resumed["resumed_from"].endswith("step-00000002") or "2" in resumed["resumed_from"]
    assert first["losses"] + resumed["losses"] == straight["losses"]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_fused_optimizer_step_matches_foreach(files, tmp_path, kind):
    # Fine-tuning steps through train.optim.clip_or_step_on_device as pretraining does: with fused AdamW
    # the clip and the skip run inside the optimizer kernel; the losses follow the for-each path's.
    common = {"train.max_steps": 3, "optim.grad_clip": 0.05}
    a = finetune(_cfg(kind, files, tmp_path / "a", **common, **{"optim.fused": False}))
    b = finetune(_cfg(kind, files, tmp_path / "b", **common, **{"optim.fused": True}))
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)


# ---- DPO -------------------------------------------------------------------------------------------
def test_dpo_raises_chosen_over_rejected_margin(files, tmp_path):
    prefs = read_preference_jsonl(files["prefs"])
    assert prefs[-1][0][-1]["content"] == "Hi!" and prefs[0][1][-1]["content"] == "I do not know."
    # Held-out = the training pairs: the policy starts equal to the reference (margin 0) and must move up.
    cfg = _cfg("dpo", files, tmp_path / "dpo", **{"data.val": str(files["prefs"]), "train.max_steps": 6,
                                                  "optim.lr": 1e-3, "dpo.beta": 0.5})
    r = finetune(cfg)
    assert r["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at step 0
    assert r["val_reward_margin"] > 0.1 and r["val_reward_accuracy"] > 0.9
    assert r["val_loss"] < 0.69


def test_dpo_with_lora_uses_the_base_as_reference(files, tmp_path):
    cfg = _cfg("dpo", files, tmp_path / "dpo_lora", **{"data.val": str(files["prefs"]), "train.max_steps": 4,
                                                       "optim.lr": 1e-2, "lora.enabled": True, "lora.dropout": 0.0})
    r = finetune(cfg)
    assert r["losses"][0] == pytest.approx(0.6931, abs=1e-3)
    assert r["val_reward_margin"] > 0 and Path(r["adapter_dir"], "adapter_model.safetensors").is_file()


def test_config_errors_are_clear(files, tmp_path):
    with pytest.raises(TinyLlamaError, match="model.path is required"):
        load_finetune_config("sft", None, [], **{"data.train": str(files["train"])})
    with pytest.raises(TinyLlamaError, match="unknown field"):
        load_finetune_config("sft", None, ["--train.nosuch", "1"], **{"model.path": "x", "data.train": "y"})
    with pytest.raises(TinyLlamaError, match="expected a number"):
        load_finetune_config("sft", None, ["--optim.lr", "fast"], **{"model.path": "x", "data.train": "y"})


@pytest.mark.parametrize("mode", ["full", "lora-int8"])
def test_sft_two_processes_match_one(files, tmp_path, mode):
    """torchrun × 2 (gloo on CPU) follows the 1-process loss curve for the same global batch: full fine-tuning
    under FSDP2, and LoRA over an int8 base (replicated, adapter gradients averaged)."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    args = {"train.max_steps": 3, "optim.max_steps": 3, "data.val_fraction": 0.0}
    extra = []
    if mode == "lora-int8":
        args.update({"lora.enabled": True, "lora.quantize": "int8", "lora.dropout": 0.0, "optim.lr": 1e-2})
        extra = ["--quantize", "int8", "--lora.dropout", "0", "--optim.lr", "1e-2"]
    single = finetune(_cfg("sft", files, tmp_path / "one", **args))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tinyllama", "sft",
           "--model", str(files["base"]), "--data", str(files["train"]), "--out", str(tmp_path / "two"),
           "--max-steps", "3", "--optim.max_steps", "3", "--data.val_fraction", "0", "--data.seq_len", str(SEQ),
           "--train.micro_batch", "1", "--train.global_batch", "4", "--optim.lr", "3e-3", "--optim.warmup_steps", "0",
           "--train.export_hf", "hf", "--train.dtype", "float32", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in recs if r["kind"] == "train"]
    assert two == pytest.approx(single["losses"], rel=1e-4)
    assert Llama.from_pretrained(tmp_path / "two" / "hf").config.n_layers == 2


def test_sft_cli_lora_on_int4_base_exports_merged_model_and_adapter(files, tmp_path):
    from tinyllama.cli import main

    out = tmp_path / "q"
    rc = main(["sft", "--model", str(files["base"]), "--data", str(files["train"]), "--out", str(out),
               "--quantize", "int4", "--lora.group_size", "32", "--max-steps", "2", "--data.seq_len", str(SEQ),
               "--train.micro_batch", "2", "--train.global_batch", "2", "--optim.lr", "1e-2", "--train.progress", "false",
               "--train.dtype", "float32"])  # in bf16 the frozen base is held (and exported) in bf16
    assert rc == 0
    merged = Llama.from_pretrained(out / "hf")
    base = Llama.from_pretrained(files["base"])
    # Adapter targets moved; embeddings (never quantized, never trained) are untouched.
    assert torch.equal(merged.embed_tokens.weight, base.embed_tokens.weight)
    assert not torch.equal(merged.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and "q_proj" in cfg["target_modules"]


def test_dpo_loss_and_preference_batch():
    from tinyllama.finetune.chat_data import preference_batch
    from tinyllama.finetune.trainer import dpo_loss

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    loss, reward_c, reward_r = dpo_loss(pc, pr, rc, rr, beta=0.2)
    z = 0.2 * ((-3.0 + 5.0) - (-4.0 + 4.5))
    assert float(loss) == pytest.approx(-torch.log(torch.sigmoid(torch.tensor(z))).item())
    assert float(reward_c) == pytest.approx(0.2) and float(reward_r) == pytest.approx(-0.1)

    tok = Tokenizer()
    pairs = [([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "good one"}],
              [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "bad"}]),
             ([{"role": "user", "content": "question two"}, {"role": "assistant", "content": "yes"}],
              [{"role": "user", "content": "question two"}, {"role": "assistant", "content": "no no no"}])]
    inp, tgt = preference_batch(tok, pairs, 64, tok.eos_id)
    judged = [tok.decode([t for t in row.tolist() if t != IGNORE], skip_special_tokens=False) for row in tgt]
    assert judged == ["good one</s>", "yes</s>", "bad</s>", "no no no</s>"]  # chosen rows first, then rejected


def test_block_loader_resumes_on_another_process_count():
    from tinyllama.finetune.chat_data import BlockLoader

    items = torch.arange(23)
    one = BlockLoader(items, 4, seed=3)
    seq = [next(one).tolist() for _ in range(8)]  # crosses an epoch boundary
    two = [BlockLoader(items, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    got = []
    for _ in range(2):  # 2 ranks × micro 2 = the same 4 items per step as one process × 4
        got.append(sorted(next(two[0]).tolist() + next(two[1]).tolist()))
    assert got == [sorted(s) for s in seq[:2]]
    state = two[0].state_dict()
    resumed = BlockLoader(items, 4, seed=3)
    resumed.load_state_dict(state)
    assert [sorted(next(resumed).tolist()) for _ in range(3)] == [sorted(s) for s in seq[2:5]]


# ---- the one loop's guarantees, in fine-tuning ---------------------------------------------------------
class _NaNCalls:
    """Makes the loss (hence every gradient) NaN on chosen training forward calls of any Llama."""

    def __init__(self, monkeypatch, nan_calls) -> None:
        self.calls, self.nan_calls = 0, set(nan_calls)
        original = Llama.forward

        def forward(model, ids, targets=None, **kw):
            out = original(model, ids, targets, **kw)
            if model.training and torch.is_grad_enabled():  # the policy's forward, not DPO's reference
                self.calls += 1
                if self.calls in self.nan_calls:
                    return (out[0], out[1] * float("nan")) if targets is not None else out * float("nan")
            return out

        monkeypatch.setattr(Llama, "forward", forward)


def test_sft_nan_loss_is_skipped_and_counted(files, tmp_path, monkeypatch):
    _NaNCalls(monkeypatch, {3 * 2 - 1})  # a micro-batch of step 3 (2 micro-batches per step)
    r = finetune(_cfg("sft", files, tmp_path / "sft", **{"train.max_steps": 5, "train.export_hf": "hf"}))
    assert r["skipped_steps"] == 1 and r["step"] == 5 and r["stopped_by"] is None
    recs = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if x.get("skipped")] == [3]
    exported = Llama.from_pretrained(r["hf_dir"])
    assert all(torch.isfinite(v).all() for v in exported.state_dict().values())


def test_sft_nonfinite_stop_policy_and_consecutive_limit(files, tmp_path, monkeypatch):
    _NaNCalls(monkeypatch, {2 * 2})
    r = finetune(_cfg("sft", files, tmp_path / "stop", **{"train.max_steps": 6, "train.nonfinite_policy": "stop"}))
    assert r["stopped_by"] == "nonfinite" and r["step"] == 2
    assert (tmp_path / "stop" / "checkpoints" / "step-0000002").is_dir()
    _NaNCalls(monkeypatch, set(range(1, 100)))
    r = finetune(_cfg("dpo", files, tmp_path / "many", **{"train.max_steps": 6, "train.max_consecutive_nonfinite": 1}))
    assert r["stopped_by"] == "nonfinite" and r["step"] == 2 and r["skipped_steps"] == 2


def test_sft_out_of_memory_gives_the_advice(files, tmp_path, monkeypatch, capsys):
    from tinyllama.cli import main

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Llama, "forward", oom)
    rc = main(["sft", "--model", str(files["base"]), "--data", str(files["train"]), "--out", str(tmp_path / "o"),
               "--max-steps", "2", "--data.seq_len", str(SEQ), "--train.micro_batch", "2", "--train.global_batch", "4"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert rc == 2 and len(err) == 1 and "micro_batch" in err[0] and "activation_checkpointing" in err[0], err


def test_sft_sigterm_to_the_process_group_checkpoints_and_resumes_bitwise(files, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")

    def cmd(out, steps, *extra):
        return [sys.executable, "-m", "tinyllama", "sft", "--model", str(files["base"]), "--data", str(files["train"]),
                "--out", str(out), "--max-steps", str(steps), "--optim.max_steps", "40", "--data.seq_len", str(SEQ),
                "--train.micro_batch", "2", "--train.global_batch", "4", "--optim.lr", "3e-3",
                "--optim.warmup_steps", "0", "--train.export_hf", "null", "--train.log_every", "1", *extra]

    def losses(out):
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]

    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(out, 10_000), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM received: checkpoint written, exiting" in output, output[-3000:]
    stopped = len(losses(out))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"
    assert not list((out / "checkpoints").glob("*.tmp"))
    for args in ((out, stopped + 2, "--resume"), (tmp_path / "straight", stopped + 2)):
        done = subprocess.run(cmd(*args), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == losses(tmp_path / "straight")
