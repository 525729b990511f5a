"""The shipped Llama 2 tokenizer: known ids, lossless round trips, parity with transformers on real corpus."""


import pytest

from tinyllama import Tokenizer, TinyLlamaError
from tinyllama.tokenizer import NativeStreamDecoder, StreamDecoder

SAMPLES = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\r\n and   runs    of     spaces",
    "Unicode: héllo wörld, ¿qué tal? Привет, мир! 你好，世界 こんにちは 😀🚀👩‍👩‍👧 \u200b zero-width",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # comment\n\n\tif x != 0: pass\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_readme_checks(tok):
    assert tok.encode("Hello world!", bos=True) == [1, 15043, 3186, 29991]
    assert tok.id_to_token(13) == "<0x0A>"
    assert tok.id_to_token(29871) == "▁"
    digits = tok.encode("2024")
    assert [tok.id_to_token(i) for i in digits] == ["▁", "2", "0", "2", "4"]
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)


def test_bos_eos_control(tok):
    ids = tok.encode("Hi there")
    assert tok.encode("Hi there", bos=True) == [1] + ids
    assert tok.encode("Hi there", eos=True) == ids + [2]
    assert tok.encode("Hi there", bos=True, eos=True) == [1] + ids + [2]
    assert tok.decode([1] + ids + [2]) == "Hi there"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_encoding_matches_single(tok):
    batch = tok.encode_batch(SAMPLES, bos=True, eos=True)
    assert batch == [tok.encode(s, bos=True, eos=True) for s in SAMPLES]


@pytest.mark.parametrize("native", [True, False])
def test_stream_decoder_reassembles_multibyte(tok, native):
    text = "naïve café 😀 日本 done"
    prompt = tok.encode("Start:", bos=True)
    ids = tok.encode("Start: " + text)[len(prompt) - 1:]
    full = tok.encode("Start: " + text, bos=True)
    assert full[: len(prompt)] == prompt
    dec = tok.stream_decoder(prefix=prompt) if native else StreamDecoder(tok, prompt)
    assert isinstance(dec, NativeStreamDecoder) == native
    pieces = [dec.put(i) for i in full[len(prompt):]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == " " + text
    assert ids  # sanity


def test_stream_decoder_is_exact_and_bounded_on_a_long_text(tok, corpus_docs, monkeypatch):
    # a chapter of real prose with multi-byte characters and byte-fallback tokens mixed in
    text = " ".join(w + (" 😀 日本語 naïve" if i % 50 == 0 else "") for i, w in enumerate(corpus_docs["moby-dick"][0].split()))
    prompt = tok.encode("Story:", bos=True)
    ids = tok.encode("Story: " + text, bos=True)[len(prompt):]
    assert len(ids) > 3000
    sizes = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda i, **kw: sizes.append(len(i)) or decode(i, **kw))
    dec = StreamDecoder(tok, prompt)  # the fallback (SentencePiece .model tokenizers, older `tokenizers`)
    out = "".join(dec.put(i) for i in ids)
    assert out == decode(prompt + ids)[len(decode(prompt)):]
    assert max(sizes) <= 40  # a window of recent ids per token (32 + a split UTF-8 character), not all so far
    native = tok.stream_decoder(prefix=prompt)  # tokenizers' DecodeStream: the same text
    assert isinstance(native, NativeStreamDecoder) and "".join(native.put(i) for i in ids) == out


def test_ids_identical_to_transformers_on_corpus(tok, corpus_docs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.source_path.parent))
    texts = [t[:4000] for source in ("moby-dick", "sotu", "code") for t in corpus_docs[source][:6]]
    assert len(texts) == 18 and all(texts)
    for text in texts:
        assert tok.encode(text, bos=True) == hf(text).input_ids
        assert tok.decode(tok.encode(text)) == text


def test_loads_user_tokenizer_json_and_dir(tmp_path, tok):
    tok.save_pretrained(tmp_path / "t")
    for path in (tmp_path / "t", tmp_path / "t" / "tokenizer.json"):
        other = Tokenizer(path)
        assert other.encode("Hello world!") == tok.encode("Hello world!")
        assert other.fingerprint() == tok.fingerprint()


def test_loads_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(["the quick brown fox jumps over the lazy dog %d times" % i for i in range(300)]))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=320, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    t = Tokenizer(tmp_path / "sp.model")
    assert (t.bos_id, t.eos_id, t.unk_id, t.vocab_size) == (1, 2, 0, 320)
    ids = t.encode("the lazy fox", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert t.decode(ids) == "the lazy fox"
    assert t.decode(t.encode("über 😀")) == "über 😀"  # byte fallback


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TinyLlamaError, match="not found"):
        Tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TinyLlamaError, match="tokenizer.json"):
        Tokenizer(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyLlamaError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path / "empty")


def test_stream_decoder_survives_byte_runs_that_change_emitted_text(tok):
    """Byte-fallback tokens that formed text ("\\n" is <0x0A>), then stray bytes: DecodeStream refuses the next
    token (the whole run re-decodes as U+FFFD per byte); the native decoder hands over to the window one and
    gives its text. A prompt window ending mid-character is not re-emitted."""
    prompt = tok.encode("Hi", bos=True)
    ids = [13, 0xF0 + 3, 0x9F + 3] + tok.encode("world")
    native = tok.stream_decoder(prefix=prompt)
    assert isinstance(native, NativeStreamDecoder)
    window = StreamDecoder(tok, prompt)
    assert "".join(native.put(i) for i in ids) == "".join(window.put(i) for i in ids) == "\n\ufffd\ufffd world"
    assert native.fallback is not None
    for prompt in (tok.encode("Say: ꙮꙮꙮ", bos=True)[-8:], tok.encode("Korean: 맙", bos=True) + [0xEC + 3]):
        dec = tok.stream_decoder(prefix=prompt)
        assert "".join(dec.put(i) for i in tok.encode("ok fine")) == " ok fine"
