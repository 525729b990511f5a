"""Tuned kernel choices kept on disk (tinyllama.kernels.tuning_store): what one process keeps, the next restores,
under the same code only; the file is never half-written, writers merge under a lock, a bad file is tuned past,
and reading one builds nothing but plain data and the registered configs."""

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from tinyllama.kernels.tuning_store import ENV, KEEP_FINGERPRINTS, TuningStore


@dataclasses.dataclass(frozen=True)
class Tile:  # stands in for the kernels' GemvConfig
    block_n: int
    stages: int = 3
    prenorm: bool = False


class Split(NamedTuple):  # for AttentionConfig
    splits: int
    block: int


def store(fingerprint="code A"):
    return TuningStore("tuning.json", lambda: fingerprint, [Tile, Split])


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "tuning.json"
    monkeypatch.setenv(ENV, str(path))
    return path


def test_what_one_process_keeps_the_next_restores(cache_file):
    kept = {"tiles": {("H200", 32, torch.bfloat16, (11264, 2048), True): Tile(64, 4, True)},
            "steps": {("H200", "step", (Tile(64), Tile(32)), Split(1, 128)): (None, {"a": 1.5, Split(4, 32): 2.0}),
                      ("H200", "step", 2): ("deferred", {})}}
    store().persist(kept)
    assert sorted(p.name for p in cache_file.parent.iterdir()) == ["tuning.json", "tuning.json.lock"]  # no temp left
    later = {"tiles": {("H200", 1, torch.bfloat16, (2560, 2048), True): Tile(4, 1)}, "steps": {}}
    s = store()
    assert s.restore(later) == 3
    assert later["tiles"][("H200", 32, torch.bfloat16, (11264, 2048), True)] == Tile(64, 4, True)
    assert later["steps"] == kept["steps"]
    restored = next(iter(later["steps"]))
    assert type(restored[2][0]) is Tile and type(restored[3]) is Split and hash(restored) == hash(next(iter(kept["steps"])))
    assert s.restore({"tiles": {}}) == 0  # once per process


def test_a_choice_this_process_made_wins_over_the_kept_one(cache_file):
    store().persist({"tiles": {"k": Tile(1)}})
    mine = {"tiles": {"k": Tile(2)}}
    assert store().restore(mine) == 0 and mine["tiles"]["k"] == Tile(2)


def test_other_code_restores_nothing_and_both_are_kept(cache_file):
    store("code A").persist({"tiles": {"k": Tile(1)}})
    other = {"tiles": {}}
    assert store("code B").restore(other) == 0 and other == {"tiles": {}}
    store("code B").persist({"tiles": {"k": Tile(2)}})
    got_a, got_b = {"tiles": {}}, {"tiles": {}}
    store("code A").restore(got_a)
    store("code B").restore(got_b)
    assert got_a["tiles"]["k"] == Tile(1) and got_b["tiles"]["k"] == Tile(2)


def test_only_the_latest_fingerprints_are_kept(cache_file):
    for i in range(KEEP_FINGERPRINTS + 2):
        store(f"code {i}").persist({"tiles": {"k": Tile(i)}})
    assert len(json.loads(cache_file.read_text())["tunings"]) == KEEP_FINGERPRINTS
    oldest, newest = {"tiles": {}}, {"tiles": {}}
    store("code 0").restore(oldest)
    store(f"code {KEEP_FINGERPRINTS + 1}").restore(newest)
    assert oldest == {"tiles": {}} and newest["tiles"]["k"] == Tile(KEEP_FINGERPRINTS + 1)


def test_processes_writing_in_turn_keep_each_others_choices(cache_file):
    store().persist({"tiles": {"a": Tile(1)}})
    store().persist({"tiles": {"b": Tile(2)}})  # another process, which never restored "a"
    got = {"tiles": {}}
    store().restore(got)
    assert got["tiles"] == {"a": Tile(1), "b": Tile(2)}


def test_a_truncated_file_is_tuned_past_with_one_line_and_then_replaced(cache_file):
    store().persist({"tiles": {"k": Tile(1)}})
    cache_file.write_text(cache_file.read_text()[:10])
    got = {"tiles": {}}
    with pytest.warns(UserWarning, match=f"{cache_file}: not a readable tuning cache.*{ENV}=off"):
        assert store().restore(got) == 0
    with pytest.warns(UserWarning, match="not a readable tuning cache"):  # read again to merge, then replaced
        store().persist({"tiles": {"k": Tile(3)}})
    again = {"tiles": {}}
    store().restore(again)
    assert again["tiles"]["k"] == Tile(3)


def test_a_file_naming_anything_but_the_registered_types_is_refused(cache_file):
    cache_file.parent.mkdir(parents=True)
    entry = [{"tuple": ["k"]}, {"config": "system", "fields": {"command": "touch x"}}]
    cache_file.write_text(json.dumps({"format": 1, "tunings": {"code A": {"tiles": [entry]}}}))
    got = {"tiles": {}}
    with pytest.warns(UserWarning, match="tuning cache not used .*not a tuning value"):
        assert store().restore(got) == 0
    assert got == {"tiles": {}}
    cache_file.write_text(json.dumps({"format": 99, "tunings": {}}))
    with pytest.warns(UserWarning, match="not a tuning cache of this version"):
        assert store().restore({"tiles": {}}) == 0


def test_a_choice_of_an_unregistered_type_is_not_written(cache_file):
    store().persist({"tiles": {"k": Tile(1)}})
    with pytest.warns(UserWarning, match="could not keep the tuned kernel choices.*complex is not a type"):
        store().persist({"tiles": {"j": complex(1, 2)}})
    got = {"tiles": {}}
    store().restore(got)
    assert got == {"tiles": {"k": Tile(1)}}  # the file as it was


def _persist_many(path, first, start):
    os.environ[ENV] = path
    start.wait()  # both writers at once
    for i in range(first, first + 40):
        store().persist({"tiles": {("key", i): Tile(i)}})


def test_processes_writing_at_once_keep_every_choice(cache_file):
    """Each writer reads, merges and renames under the lock: without it one writer's rename drops the other's
    latest choices (seen here: 40 + 40 writes at once lost some)."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    writers = [ctx.Process(target=_persist_many, args=(str(cache_file), first, start)) for first in (0, 100)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    got = {"tiles": {}}
    store().restore(got)
    assert set(got["tiles"]) == {("key", i) for i in (*range(40), *range(100, 140))}


def test_off_keeps_nothing_and_an_unwritable_place_only_warns(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "off")
    s = store()
    assert s.path() is None
    s.persist({"tiles": {"k": Tile(1)}})
    assert s.restore({"tiles": {}}) == 0
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(ENV, str(blocker / "tuning.json"))  # its folder is a file
    with pytest.warns(UserWarning, match="could not keep the tuned kernel choices"):
        store().persist({"tiles": {"k": Tile(1)}})


def test_default_place_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert store().path() == tmp_path / "tinyllama" / "tuning.json"


def test_not_reading_still_writes(cache_file):
    store().persist({"tiles": {"k": Tile(1)}})
    s = store()
    s.read = False  # bench generate without --reuse-tuning: times every candidate, keeps its choices
    assert s.restore({"tiles": {}}) == 0
    s.persist({"tiles": {"j": Tile(2)}})
    got = {"tiles": {}}
    store().restore(got)
    assert set(got["tiles"]) == {"k", "j"}


def test_the_decode_steps_tables_round_trip_through_their_store(cache_file, monkeypatch):
    """The decode step's own store: its keys and choices (tiles, attention, persistent configurations, dtypes)
    are all types its codec writes and builds again, read back in a new process; the fingerprint names Triton
    and torch."""
    pytest.importorskip("triton")
    from tinyllama.kernels import decode as D
    from tinyllama.kernels import decode_persistent as P

    attention = ("H200", "attention", 32, torch.bfloat16, True, 32, 4, 64, tuple(D.ATTENTION_CANDIDATES), 382)
    step = ("H200", "step", 32, torch.bfloat16, True, tuple(D.ROWS_CANDIDATES[:2]), tuple(D.ROWS_CANDIDATES[:2]),
            ("layered", "layered, split-K sums deferred"), D.ATTENTION_CANDIDATES[0], 22, 2048, 32, 4, 5632, 32000)
    tables = {"products and attention": {("H200", 32, (11264, 2048), True, False, True, True): D.ROWS_CANDIDATES[-1],
                                         attention: (D.ATTENTION_CANDIDATES[1], {c: 1.5 for c in D.ATTENTION_CANDIDATES})},
              "whole step": {step: (D.DEFERRED, {"layered": 990.0}), step + (1,): (P.PERSISTENT_CANDIDATES[0], {}),
                             step + (2,): (None, {})}}
    monkeypatch.setattr(D, "_TUNED", tables["products and attention"])
    monkeypatch.setattr(D, "_TUNED_STEP", tables["whole step"])
    D.TUNING_STORE.persist(D._tuning_tables())
    assert "triton" in D.TUNING_STORE.fingerprint() and torch.__version__ in D.TUNING_STORE.fingerprint()
    code = ("import torch\nfrom tinyllama.kernels import decode as D\nfrom tinyllama.kernels import decode_persistent\n"
            "assert D.TUNING_STORE.restore(D._tuning_tables()) == 5\n"
            "print(repr((D._TUNED, D._TUNED_STEP)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, ENV: str(cache_file)})
    assert out.returncode == 0, out.stderr[-2000:]
    namespace = {"torch": torch, "GemvConfig": D.GemvConfig, "AttentionConfig": D.AttentionConfig,
                 "PersistentConfig": P.PersistentConfig}
    assert eval(out.stdout, namespace) == (tables["products and attention"], tables["whole step"])
