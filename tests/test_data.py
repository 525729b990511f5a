"""Data pipeline: prepare (round trip, bad input, restart, workers), LITPKDS, and the mixture loader."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllama.data import (
    DataConfig, MixtureLoader, Permutation, TokenSource, build_train_loader, ensure_demo_dataset, prepare, val_loader,
)
from tinyllama.data.prepare import write_token_dataset
from tinyllama.errors import TinyLlamaError
from tinyllama.tokenizer import Tokenizer

@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["whale", "ship", "sea", "Ishmael", "def", "return", "λ", "naïve", "🐳", "the", "of", "\n", "  ", "x = 1;"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) + f" doc{i}" for i in range(n)]


def _zst(path: Path, lines: list[bytes]) -> None:
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))


def _jsonl(texts, **extra) -> list[bytes]:
    return [json.dumps({"text": t, **extra}).encode() for t in texts]


def _decoded_docs(ds: Path, split: str) -> list[list[int]]:
    return [d.tolist() for d in TokenSource(ds, split).documents()]


# ---- prepare ------------------------------------------------------------------------------------
def test_round_trip_all_formats(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(60)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.jsonl").write_bytes(b"\n".join(_jsonl(docs[:15])) + b"\n\n")  # a blank line is not a document
    _zst(src / "sub" / "b.jsonl.zst", _jsonl(docs[15:30], meta={"redpajama_set_name": "RedPajamaBook"}))
    with gzip.open(src / "c.json.gz", "wb") as f:
        f.write(b"\n".join(_jsonl(docs[30:45])))  # no trailing newline: last line still read
    pq.write_table(pa.table({"content": docs[45:59], "lang": ["Python"] * 14}), src / "d.parquet")
    (src / "e.txt").write_text(docs[59])
    m = prepare([src], src / "ds", val_fraction=0.25, shard_tokens=100, tokenizer=tok)
    assert prepare([src], src / "ds", val_fraction=0.25, shard_tokens=100, tokenizer=tok)["run"]["docs"] == 0
    (tmp_path / "ds").symlink_to(src / "ds")  # (output inside the input directory is not read back as input)

    want = {tuple(tok.encode(d) + [tok.eos_id]) for d in docs}
    train, val = _decoded_docs(tmp_path / "ds", "train"), _decoded_docs(tmp_path / "ds", "val")
    assert len(train) + len(val) == len(docs) and val and train
    assert {tuple(d) for d in train} | {tuple(d) for d in val} == want
    assert not {tuple(d) for d in train} & {tuple(d) for d in val}  # validation never overlaps train
    assert all(d[-1] == tok.eos_id for d in train + val)
    assert sorted(tok.decode(d) for d in train + val) == sorted(docs)
    # no token lost or padded: every token of every document is in exactly one shard
    total = sum(len(d) for d in want)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total
    assert len(m["splits"]["train"]["shards"]) > 5 and m["dtype"] == "uint16" and m["complete"]
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert [i["file"] for i in m["inputs"]] == ["a.jsonl", "c.json.gz", "d.parquet", "e.txt", "b.jsonl.zst"]
    raw = (tmp_path / "ds" / m["splits"]["train"]["shards"][0]["file"]).read_bytes()
    assert raw[:8] == b"TLTOKS\x00\x01"


def test_fast_encoder_is_exact(tok, corpus_docs):
    from tinyllama.data.prepare import fast_encoder

    enc = fast_encoder(tok)
    assert enc is not tok.encode_batch  # the Llama 2 tokenizer takes the word-split fast path
    texts = ["", " ", "  two  spaces  ", "\n\n  indented\n\tdef f(x):\n        return x  ", "naïve café 🐳 日本語",
             "trailing   ", "a" * 3000, " leading", "x\u2581y ▁▁z", "<s> </s> [INST]"] + _docs(30, seed=3)
    assert enc(texts) == tok.encode_batch(texts)
    code = corpus_docs["code"][:40]
    assert enc(code) == tok.encode_batch(code)


def test_drop_filter_and_field(tmp_path, tok):
    lines = _jsonl(["keep me"], meta={"redpajama_set_name": "RedPajamaBook"})
    lines += _jsonl(["drop me"], meta={"redpajama_set_name": "RedPajamaGithub"})
    lines += [json.dumps({"body": "x", "text": "also kept"}).encode()]
    _zst(tmp_path / "s.jsonl.zst", lines)
    m = prepare([tmp_path / "s.jsonl.zst"], tmp_path / "ds", val_fraction=0, tokenizer=tok,
                filters=["meta.redpajama_set_name=RedPajamaGithub"])
    assert sorted(tok.decode(d) for d in _decoded_docs(tmp_path / "ds", "train")) == ["also kept", "keep me"]
    assert m["inputs"][0]["filtered"] == 1
    m = prepare([tmp_path / "s.jsonl.zst"], tmp_path / "ds2", val_fraction=0, tokenizer=tok, field="body", skip_bad=True)
    assert [tok.decode(d) for d in _decoded_docs(tmp_path / "ds2", "train")] == ["x"] and m["inputs"][0]["skipped"] == 2


@pytest.mark.parametrize(
    "case, content, where, reason",
    [
        ("malformed_json", [b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": "unterminated'], "line 3",
         "malformed JSON (Unterminated string starting at column 10)"),  # was "... starting at at column 10"
        ("no_comma", [b'{"text": "ok" "meta": 1}'], "line 1", "malformed JSON (Expecting ',' delimiter at column 15)"),
        ("missing_field", [b'{"text": "ok"}', b'{"title": "no text"}'], "line 2", "missing field"),
        ("not_a_string", [b'{"text": 5}'], "line 1", "expected a string"),
        ("invalid_utf8", [b'{"text": "ok"}', b'{"text": "caf\xe9"}', b'{"text": "ok"}'], "line 2", "invalid UTF-8"),
    ],
)
def test_bad_record_stops_with_file_and_line_or_is_skipped(tmp_path, tok, case, content, where, reason):
    f = tmp_path / f"{case}.jsonl.zst"
    _zst(f, content)
    with pytest.raises(TinyLlamaError) as e:
        prepare([f], tmp_path / "ds", tokenizer=tok)
    assert f"{f}:{where}: " in str(e.value) and reason in str(e.value) and "--skip-bad" in str(e.value)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    m = prepare([f], tmp_path / "ds2", tokenizer=tok, skip_bad=True, val_fraction=0)
    n_good = sum(1 for line in content if line == b'{"text": "ok"}')
    assert m["inputs"][0]["skipped"] == 1 and m["splits"]["train"]["documents"] == n_good
    assert where in m["inputs"][0]["skipped_examples"][0]


def test_json_lines_reader_names_line_and_column(tmp_path):
    from tinyllama.data.readers import read_jsonl_objects

    f = tmp_path / "items.jsonl"
    f.write_text('{"a": 1}\n{"b": "x')
    with pytest.raises(TinyLlamaError) as e:
        list(read_jsonl_objects(f))
    assert str(e.value) == f"{f}:2: not valid JSON (Unterminated string starting at column 7)"


def test_corrupt_and_truncated_zstd(tmp_path, tok):
    import zstandard

    data = zstandard.ZstdCompressor().compress(b"\n".join(_jsonl(_docs(3000))) + b"\n")  # several zstd blocks
    (tmp_path / "trunc.jsonl.zst").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 64)
    for name, reason in (("trunc", "truncated zstd"), ("garbage", "corrupt zstd")):
        with pytest.raises(TinyLlamaError, match=f"{name}.jsonl.zst:line \\d+: {reason}"):
            prepare([tmp_path / f"{name}.jsonl.zst"], tmp_path / f"ds-{name}", tokenizer=tok)
    m = prepare([tmp_path / "trunc.jsonl.zst"], tmp_path / "ds-skip", tokenizer=tok, skip_bad=True, val_fraction=0)
    assert m["inputs"][0]["skipped"] >= 1 and 0 < m["splits"]["train"]["documents"] < 3000


def test_bad_inputs_named(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(TinyLlamaError, match="input file not found"):
        prepare([tmp_path / "nope.jsonl"], tmp_path / "ds", tokenizer=tok)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(TinyLlamaError, match="x.csv: unsupported input type"):
        prepare([tmp_path / "x.csv"], tmp_path / "ds", tokenizer=tok)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(TinyLlamaError, match="p.parquet: no column 'text' / 'content'"):
        prepare([tmp_path / "p.parquet"], tmp_path / "ds", tokenizer=tok)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TinyLlamaError, match="bad.parquet: not a readable parquet file"):
        prepare([tmp_path / "bad.parquet"], tmp_path / "ds", tokenizer=tok)


def _make_inputs(d: Path, n_files=4) -> list[Path]:
    d.mkdir()
    for k in range(n_files):
        _zst(d / f"part{k}.jsonl.zst", _jsonl(_docs(30, seed=k)))
    return sorted(d.glob("*.zst"))


def _dataset_bytes(ds: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ds.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_restart_after_kill_gives_same_dataset_and_workers_agree(tmp_path, tok, monkeypatch):
    inputs = _make_inputs(tmp_path / "in")
    ref = prepare(inputs, tmp_path / "ref", name="web", val_fraction=0.2, shard_tokens=300, tokenizer=tok)
    per_unit = max(sum(1 for sp in ("train", "val") for s in ref["splits"][sp]["shards"] if f"-u{u:05d}-" in s["file"])
                   for u in range(4))
    # A worker process is really killed (os._exit, as by `kill -9`) right after its (per_unit+1)-th shard
    # landed: it has finished one input and is inside its second; the parent stops the other worker.
    monkeypatch.setenv("TINYLLAMA_TEST_KILL_AFTER_SHARDS", str(per_unit + 1))
    killed = tmp_path / "killed"
    with pytest.raises(TinyLlamaError, match="worker process died.*re-run the same command"):
        prepare(inputs, killed, name="web", val_fraction=0.2, shard_tokens=300, tokenizer=tok, workers=2)
    monkeypatch.delenv("TINYLLAMA_TEST_KILL_AFTER_SHARDS")
    assert not (killed / "manifest.json").exists()
    assert 1 <= len(list((killed / ".units").glob("*.json"))) < 4  # some inputs finished, some not
    with pytest.raises(TinyLlamaError, match="no manifest.json"):
        TokenSource(killed)  # a loader never reads a dataset that is not finished
    unfinished = min(u for u in range(4) if not (killed / ".units" / f"u{u:05d}.json").exists())
    (killed / f".train-u{unfinished:05d}-00000.bin.tmp-999").write_bytes(b"half")  # a killed writer's temp file
    again = prepare(inputs, killed, name="web", val_fraction=0.2, shard_tokens=300, tokenizer=tok)
    assert 0 < again["run"]["docs"] < 120  # finished inputs were skipped
    again.pop("run"), ref.pop("run")
    # shards written by worker processes before the kill + in-process after it == one uninterrupted run
    assert again == ref and _dataset_bytes(killed) == _dataset_bytes(tmp_path / "ref")
    assert not list(killed.glob(".*.tmp-*"))
    with pytest.raises(TinyLlamaError, match="different settings"):
        prepare(inputs, killed, val_fraction=0.3, tokenizer=tok)


def test_shard_index_parts_merge(tmp_path, tok):
    inputs = _make_inputs(tmp_path / "in", 3)
    ref = prepare(inputs, tmp_path / "ref", name="n", val_fraction=0.1, tokenizer=tok)
    part = prepare(inputs, tmp_path / "multi", name="n", val_fraction=0.1, tokenizer=tok, shard_index=1, num_shards=2)
    assert not part["complete"] and [i["file"] for i in part["inputs"]] == ["part1.jsonl.zst"]
    prepare(inputs, tmp_path / "multi", name="n", val_fraction=0.1, tokenizer=tok, shard_index=0, num_shards=2)
    final = prepare(inputs, tmp_path / "multi", name="n", val_fraction=0.1, tokenizer=tok)
    assert final["run"]["docs"] == 0 and final["complete"]
    final.pop("run"), ref.pop("run")
    assert final == ref


def test_prepare_cli_one_line_errors(tmp_path, capsys):
    from tinyllama.cli import main

    _zst(tmp_path / "a_good.jsonl.zst", [b'{"text": "fine"}'] + [b'{"text": "a bigger file, done first"}'] * 20)
    _zst(tmp_path / "bad.jsonl.zst", [b'{"text": "ok"}', b"{oops"])
    args = ["prepare", str(tmp_path / "*.jsonl.zst"), "-o", str(tmp_path / "ds"), "--no-progress", "--val-fraction", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl.zst:line 2: malformed JSON" in err
    assert (tmp_path / "ds" / ".units" / "u00000.json").exists()  # the good file is finished and kept
    assert main(args + ["--skip-bad"]) == 0  # the natural retry: only the bad file is redone
    out = capsys.readouterr().out
    assert "skipped 1 bad records" in out and "line 2: malformed JSON" in out and "this run 2 tokens" in out  # "ok" + </s>
    assert sorted(Tokenizer().decode(d) for d in _decoded_docs(tmp_path / "ds", "train"))[-2:] == ["fine", "ok"]


def test_real_corpus_round_trip(tmp_path, tok, corpus_docs):
    # A SlimPajama-style file of real prose: a sixth of the packaged corpus (prepare's speed is not under test)
    texts = corpus_docs["moby-dick"][:40] + corpus_docs["sotu"][:10]
    _zst(tmp_path / "prose.jsonl.zst", _jsonl(texts, meta={"redpajama_set_name": "RedPajamaBook"}))
    m = prepare([tmp_path / "prose.jsonl.zst"], tmp_path / "prose", val_fraction=0.05, tokenizer=tok)
    got = sorted(tok.decode(d) for sp in ("train", "val") for d in _decoded_docs(tmp_path / "prose", sp))
    assert got == sorted(texts) and m["splits"]["val"]["documents"] > 0


# ---- LITPKDS ----------------------------------------------------------------------------------------
def _write_litpkds(path: Path, tokens: np.ndarray, chunk_size: int, dtype=np.uint16, code=8) -> None:
    # lit-gpt's PackedDatasetBuilder layout: magic, version u64, dtype code u8, chunk size u64, tokens
    arr = np.full(chunk_size, 1, dtype=dtype)
    arr[: len(tokens)] = tokens
    path.write_bytes(b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", chunk_size) + arr.tobytes())


def test_reads_litpkds(tmp_path):
    d = tmp_path / "lit"
    d.mkdir()
    toks = np.arange(5000) % 32000
    _write_litpkds(d / "train_slim_0000000000.bin", toks[:2049 * 1], 2049)
    _write_litpkds(d / "train_slim_0000000001.bin", toks[2049:4098], 2049)
    _write_litpkds(d / "train_star_0000000000.bin", toks[4098:], 2049, np.int32, 4)
    ts = TokenSource(d)
    assert ts.num_tokens == 3 * 2049
    assert ts.read(0, 5000).tolist() == toks.tolist() and ts.read(5000, 1147).tolist() == [1] * 1147
    loader = MixtureLoader([(d, 1.0)], seq_len=2048, batch_size=3)
    batch = next(loader)
    assert sorted(batch[:, 0].tolist()) == [0, 2049, 4098]  # each file is one block
    (tmp_path / "broken.bin").write_bytes(b"LITPKDS" + struct.pack("<QBQ", 1, 8, 100) + b"\0" * 10)
    with pytest.raises(TinyLlamaError, match="truncated"):
        TokenSource(tmp_path / "broken.bin")


def test_a_path_that_is_not_a_dataset_names_the_prepared_datasets_near_it(tmp_path):
    """A training or validation path set to the demo's `out/data/demo` (missing) or to its fingerprinted folder
    (datasets inside, no manifest of its own) fails in one line naming the datasets; a path with none near it
    names none."""
    import re

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "one two three"}) + "\n")
    data = tmp_path / "data"
    for name in ("prose", "code"):
        prepare([src], data / "demo-0123456789" / name, val_fraction=0.0)
    named = re.escape(f" (prepared datasets: {data}/demo-0123456789/code {data}/demo-0123456789/prose)") + "$"
    with pytest.raises(TinyLlamaError, match=r"data/demo: dataset not found \(prepare it with .*\)" + named):
        TokenSource(data / "demo")
    with pytest.raises(TinyLlamaError, match=r"demo-0123456789: neither a prepared dataset .*file\(s\)" + named):
        TokenSource(data / "demo-0123456789", "val")
    with pytest.raises(TinyLlamaError, match=r"data/other: dataset not found \(prepare it with [^()]*\)$"):
        TokenSource(data / "other")


# ---- loader -------------------------------------------------------------------------------------
L = 15  # seq_len for loader tests: blocks of 16 tokens


def _arange_dataset(path: Path, n_tokens: int, base: int = 0, doc_len: int = 37, shard_tokens: int = 200) -> Path:
    toks = np.arange(base, base + n_tokens)
    docs = [toks[i:i + doc_len] for i in range(0, n_tokens, doc_len)]
    write_token_dataset(path, {"train": docs, "val": docs[: max(1, len(docs) // 5)]}, shard_tokens=shard_tokens)
    return path


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [_arange_dataset(root / n, t, base) for n, t, base in (("a", 1605, 0), ("b", 997, 10000), ("c", 500, 20000))]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 64, 1000, 4097):
        p = Permutation(n, [1, 2, 3, 4, 5, 6])
        assert sorted(p(i) for i in range(n)) == list(range(n))
    assert [Permutation(1000, [7] * 6)(i) for i in range(10)] != list(range(10))


def test_deterministic_and_seeded(three):
    srcs = [(three[0], 0.5), (three[1], 0.3), (three[2], 0.2)]
    a = torch.cat(_take(MixtureLoader(srcs, L, 4, seed=1), 20))
    b = torch.cat(_take(MixtureLoader(srcs, L, 4, seed=1), 20))
    c = torch.cat(_take(MixtureLoader(srcs, L, 4, seed=2), 20))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (80, L + 1)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(80, L, dtype=torch.int64))  # contiguous windows


def test_exact_resume_at_several_stop_points(three):
    srcs = [(three[0], 0.6), (three[1], 0.4)]
    ref = _take(MixtureLoader(srcs, L, 3, seed=5), 60)  # 180 samples: several epochs of source b
    for k in (0, 1, 13, 37, 59):
        first = MixtureLoader(srcs, L, 3, seed=5)
        _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # JSON-able and small
        assert len(json.dumps(state)) < 400
        resumed = MixtureLoader(srcs, L, 3, seed=5)
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(_take(resumed, 60 - k), ref[k:]))


def test_resume_with_workers_and_different_world_size(three):
    srcs = [(three[0], 0.7), (three[1], 0.3)]
    ref = _take(MixtureLoader(srcs, L, 4, seed=3), 12)
    one = MixtureLoader(srcs, L, 4, seed=3, num_workers=2)
    _take(one, 5)
    state = one.state_dict()
    ranks = [MixtureLoader(srcs, L, 2, seed=3, rank=r, world_size=2, num_workers=2) for r in range(2)]
    for x in ranks:
        x.load_state_dict(state)
    for step in range(5, 12):
        assert torch.equal(torch.cat([next(x) for x in ranks]), ref[step])
    assert ranks[0].state_dict() == ranks[1].state_dict()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_and_workers_disjoint_and_cover_an_epoch(tmp_path, world_size):
    ds = _arange_dataset(tmp_path / "one", 61 * (L + 1) + 7)  # 61 blocks in epoch 0, 7 tail tokens
    n_blocks, bs = 61, 2
    loaders = [MixtureLoader([(ds, 1.0)], L, bs, seed=9, rank=r, world_size=world_size, num_workers=2)
               for r in range(world_size)]
    single = MixtureLoader([(ds, 1.0)], L, bs * world_size, seed=9)
    steps = -(-n_blocks // (bs * world_size)) + 2
    order = []
    for _ in range(steps):
        per_rank = [next(x) for x in loaders]
        assert torch.equal(torch.cat(per_rank), next(single))  # ranks together == one big batch
        order.extend(torch.cat(per_rank)[:, 0].tolist())
    epoch0 = order[:n_blocks]
    assert sorted(epoch0) == [k * (L + 1) for k in range(n_blocks)]  # every block once: disjoint and complete
    assert epoch0 != sorted(epoch0)  # shuffled
    nxt = order[n_blocks:]  # epoch 1: a fresh permutation on a shifted grid, so the tail is trained on too
    assert len(set(nxt)) == len(nxt) and all(v % (L + 1) == nxt[0] % (L + 1) for v in nxt)
    assert loaders[0].stats()["sources"]["one"]["epoch"] == 1


def test_mixture_proportions_within_one_percent(three):
    weights = [0.55, 0.3, 0.15]
    loader = MixtureLoader([(p, w) for p, w in zip(three, weights)], 3, 100, seed=0)
    firsts = torch.cat(_take(loader, 100))[:, 0]  # 10,000 blocks
    shares = [((firsts >= b) & (firsts < b + 10000)).float().mean().item() for b in (0, 10000, 20000)]
    assert all(abs(s - w) < 0.01 for s, w in zip(shares, weights)), shares
    st = loader.stats()["sources"]
    for name, w, n_blocks in (("a", 0.55, 401), ("b", 0.3, 249), ("c", 0.15, 125)):
        assert abs(st[name]["blocks"] - w * 10000) <= 1
        assert abs(st[name]["epoch"] - w * 10000 / n_blocks) <= 1  # epochs counted per source


def test_linear_ramp(three):
    loader = MixtureLoader([(three[0], 0.9), (three[1], 0.1)], 3, 100, weights_end=[0.1, 0.9], ramp_blocks=5000)
    firsts = torch.cat(_take(loader, 100))[:, 0]
    from_a = (firsts < 10000).float()
    assert abs(from_a[:500].mean().item() - 0.86) < 0.02  # mean weight over samples 0..499
    assert abs(from_a[5000:].mean().item() - 0.1) < 0.01
    assert abs(from_a[:5000].mean().item() - 0.5) < 0.01


def test_val_loader_and_config(tmp_path, three):
    cfg = DataConfig(sources=f"a:1,{three[1]}:2", paths={"a": str(three[0])}, seq_len=L)
    train = build_train_loader(cfg, 2, 0, 1, tmp_path)
    assert train.names == ["a", "b"] and next(train).shape == (2, L + 1)
    full = torch.cat(list(val_loader(cfg, 5, 0, 1, tmp_path)))
    n_a, n_b = (37 * (1605 // 37 // 5)) // 16, (37 * (997 // 37 // 5)) // 16  # val blocks per source
    assert full[:, 0].tolist()[: (n_a + n_b) // 5 * 5] == ([16 * k for k in range(n_a)] + [10000 + 16 * k for k in range(n_b)])[
        : (n_a + n_b) // 5 * 5]
    for ws in (2, 3):
        parts = [list(val_loader(cfg, 2, r, ws, tmp_path)) for r in range(ws)]
        assert len({len(p) for p in parts}) == 1  # same number of batches on every rank
        got = torch.cat([torch.cat(p) for p in parts])
        assert len(set(got[:, 0].tolist())) == len(got)  # disjoint
        assert len(full) - len(got) < ws
    v = val_loader(cfg, 2, 0, 1, tmp_path, max_blocks=3)
    assert [b.shape[0] for b in v] == [2, 1] and torch.equal(torch.cat(list(v)), torch.cat(list(v)))
    with pytest.raises(TinyLlamaError, match="neither a key"):
        build_train_loader(DataConfig(sources="nope:1"), 2, 0, 1, tmp_path)
    with pytest.raises(TinyLlamaError, match="bad entry"):
        DataConfig(sources="a:-1")
    with pytest.raises(TinyLlamaError, match="unknown field"):
        DataConfig.from_dict({"sorces": "demo"})
    with pytest.raises(TinyLlamaError, match="fewer than one block"):
        MixtureLoader([(three[2], 1.0)], 1000, 1)
    write_token_dataset(tmp_path / "other_tok", {"train": [list(range(100))]}, tokenizer_fingerprint="abc")
    with pytest.raises(TinyLlamaError, match="different tokenizers"):
        MixtureLoader([(three[0], 1.0), (tmp_path / "other_tok", 1.0)], L, 2)
    other = MixtureLoader([(three[0], 1.0)], L, 2)
    with pytest.raises(TinyLlamaError, match="saved for sources"):
        other.load_state_dict(train.state_dict())


def test_demo_dataset(tmp_path):
    paths = ensure_demo_dataset(tmp_path)
    assert set(paths) == {"prose", "code"}
    assert ensure_demo_dataset(tmp_path) == paths  # idempotent
    cfg = DataConfig(seq_len=255)
    loader = build_train_loader(cfg, 8, 0, 1, tmp_path)
    tok = Tokenizer()
    text = tok.decode(next(loader)[0].tolist())
    assert len(text) > 300
    assert len(val_loader(cfg, 4, 0, 1, tmp_path)) > 2
    sources = {n: TokenSource(p) for n, p in paths.items()}
    assert sources["prose"].num_tokens > 500_000 and sources["code"].num_tokens > 500_000
