"""Chat: template byte-identical to transformers, context window trimming, the interactive command."""

import io

import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.chat import ChatSession, chat_loop
from tinyllama.errors import TinyLlamaError
from tinyllama.generate import SamplingConfig, generate
from tinyllama.tokenizer import CHAT_TEMPLATE, Tokenizer




transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Ünïcödé ✓ 日本語\nline two"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return transformers.AutoTokenizer.from_pretrained(d)


def test_template_is_byte_identical_to_transformers(tok, hf_tok):
    assert hf_tok.chat_template == CHAT_TEMPLATE  # shipped in the exported tokenizer_config.json
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.encode() == theirs.encode()


def test_template_matches_the_tinyllama_chat_format(tok):
    conv = CONVERSATIONS[1]
    assert tok.apply_chat_template(conv) == (
        "<|system|>\nYou are a pirate.</s>\n<|user|>\nHow many legs does a spider have?</s>\n<|assistant|>\n"
    )
    ids = tok.encode(tok.apply_chat_template(conv), bos=True)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2  # </s> in the text is the EOS token


def _tiny(max_seq_len=256):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tinyllama-tiny", max_seq_len=max_seq_len)
    m = Llama(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def test_reply_streams_the_models_greedy_continuation_and_keeps_history(tok):
    model = _tiny()
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    s = ChatSession(model, tok, cfg, system="Be brief.")
    ids = s.tokenizer.encode(tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]), bos=True)
    pieces = list(s.reply("Hi there"))
    ref = generate(model, ids, max_new_tokens=12, temperature=0.0, stop_at_eos=True)
    expect = tok.decode(ids + ref)[len(tok.decode(ids)):]
    for stop in ("<|user|>", "<|system|>"):
        expect = expect.split(stop)[0]
    assert "".join(pieces) == expect.lstrip(" ")
    assert [t["role"] for t in s.turns] == ["user", "assistant"]
    assert s.turns[1]["content"] == expect.strip()
    list(s.reply("And again?"))
    assert [t["role"] for t in s.turns] == ["user", "assistant"] * 2
    rendered = s.render()
    assert rendered.startswith("<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n")
    assert "</s>\n<|user|>\nAnd again?</s>\n<|assistant|>\n" in rendered
    assert rendered.endswith(s.turns[3]["content"] + "</s>\n<|assistant|>\n")


def test_full_context_drops_oldest_turns_but_keeps_system(tok):
    model = _tiny(max_seq_len=96)
    s = ChatSession(model, tok, SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False),
                    system="Sys.")
    for i in range(6):
        list(s.reply(f"message number {i} with some padding words in it"))
        assert len(tok.encode(s.render(), bos=True)) <= 96
    assert s.dropped > 0
    assert s.turns[-2]["content"].startswith("message number 5")
    assert all("message number 0" not in t["content"] for t in s.turns)
    assert s.render().startswith("<|system|>\nSys.</s>\n")
    with pytest.raises(TinyLlamaError, match="too long"):
        list(s.reply("word " * 200))
    assert s.turns[-2]["content"].startswith("message number 5")  # the rejected message is not kept


def test_chat_command_loop_with_reset_and_system(tok):
    model = _tiny()
    s = ChatSession(model, tok, SamplingConfig(max_new_tokens=6, temperature=0.0), system=None)
    inp = io.StringIO("hello\n\n/reset\n/system Talk like a pirate.\nhi\n/help\n/exit\nnever read\n")
    out = io.StringIO()
    assert chat_loop(s, inp, out, interactive=False) == 0
    text = out.getvalue()
    assert "[conversation reset]" in text and "pirate" in text and "/reset" in text
    assert s.system == "Talk like a pirate."
    assert [t["content"] for t in s.turns if t["role"] == "user"] == ["hi"]


def test_chat_cli_end_to_end(tmp_path, tok, monkeypatch, capsys):
    from tinyllama.cli import main

    model = _tiny()
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nHi\n"))
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "[conversation reset]" in out
    assert main(["chat", "--model", str(tmp_path / "missing")]) == 2
