"""Tuned kernel choices kept on disk (tinyllama.kernels.tuning_store): what one process keeps, the next restores,
under the same code only; the file is never half-written, a bad one is tuned past, and it cannot run code."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from tinyllama.kernels.tuning_store import ENV, KEEP_FINGERPRINTS, TuningStore

ALLOWED = [("builtins", "complex")]  # a class the tables below hold, standing in for the kernels' configs


def store(fingerprint="code A", **kw):
    return TuningStore("tuning.pkl", lambda: fingerprint, ALLOWED, **kw)


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "tuning.pkl"
    monkeypatch.setenv(ENV, str(path))
    return path


def test_what_one_process_keeps_the_next_restores(cache_file):
    kept = {"tiles": {("H200", 32, (11264, 2048)): complex(64, 4)}, "steps": {("H200", "step"): (None, {"a": 1.5})}}
    store().persist(kept)
    assert cache_file.exists() and [p.name for p in cache_file.parent.iterdir()] == ["tuning.pkl"]  # no temp left
    later = {"tiles": {("H200", 1, (2560, 2048)): complex(4, 1)}, "steps": {}}
    s = store()
    assert s.restore(later) == 2
    assert later["tiles"][("H200", 32, (11264, 2048))] == complex(64, 4)
    assert later["steps"] == kept["steps"]
    assert s.restore({"tiles": {}}) == 0  # once per process


def test_a_choice_this_process_made_wins_over_the_kept_one(cache_file):
    store().persist({"tiles": {"k": complex(1, 1)}})
    mine = {"tiles": {"k": complex(2, 2)}}
    assert store().restore(mine) == 0 and mine["tiles"]["k"] == complex(2, 2)


def test_other_code_restores_nothing_and_both_are_kept(cache_file):
    store("code A").persist({"tiles": {"k": complex(1, 1)}})
    other = {"tiles": {}}
    assert store("code B").restore(other) == 0 and other == {"tiles": {}}
    store("code B").persist({"tiles": {"k": complex(2, 2)}})
    got_a, got_b = {"tiles": {}}, {"tiles": {}}
    store("code A").restore(got_a)
    store("code B").restore(got_b)
    assert got_a["tiles"]["k"] == complex(1, 1) and got_b["tiles"]["k"] == complex(2, 2)


def test_only_the_latest_fingerprints_are_kept(cache_file):
    for i in range(KEEP_FINGERPRINTS + 2):
        store(f"code {i}").persist({"tiles": {"k": complex(i, 0)}})
    assert len(pickle.loads(cache_file.read_bytes())) == KEEP_FINGERPRINTS
    oldest, newest = {"tiles": {}}, {"tiles": {}}
    store("code 0").restore(oldest)
    store(f"code {KEEP_FINGERPRINTS + 1}").restore(newest)
    assert oldest == {"tiles": {}} and newest["tiles"]["k"] == complex(KEEP_FINGERPRINTS + 1, 0)


def test_processes_writing_in_turn_keep_each_others_choices(cache_file):
    store().persist({"tiles": {"a": complex(1, 0)}})
    store().persist({"tiles": {"b": complex(2, 0)}})  # another process, which never restored "a"
    got = {"tiles": {}}
    store().restore(got)
    assert got["tiles"] == {"a": complex(1, 0), "b": complex(2, 0)}


def test_a_truncated_file_is_tuned_past_with_one_line_and_then_replaced(cache_file):
    store().persist({"tiles": {"k": complex(1, 1)}})
    cache_file.write_bytes(cache_file.read_bytes()[:10])
    got = {"tiles": {}}
    with pytest.warns(UserWarning, match=f"{cache_file}: not a readable tuning cache.*{ENV}=off"):
        assert store().restore(got) == 0
    with pytest.warns(UserWarning, match="not a readable tuning cache"):  # read again to merge, then replaced
        store().persist({"tiles": {"k": complex(3, 3)}})
    again = {"tiles": {}}
    store().restore(again)
    assert again["tiles"]["k"] == complex(3, 3)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused(cache_file, tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "ran"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(pickle.dumps({"code A": {"tiles": {"k": payload}}}))
    with pytest.warns(UserWarning, match="posix.system is not a type a tuning holds|os.system is not"):
        assert store().restore({"tiles": {}}) == 0
    assert not payload.marker.exists()


def test_off_keeps_nothing_and_an_unwritable_place_only_warns(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "off")
    s = store()
    assert s.path() is None
    s.persist({"tiles": {"k": complex(1, 1)}})
    assert s.restore({"tiles": {}}) == 0
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(ENV, str(blocker / "tuning.pkl"))  # its folder is a file
    with pytest.warns(UserWarning, match="could not keep the tuned kernel choices"):
        store().persist({"tiles": {"k": complex(1, 1)}})


def test_default_place_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert store().path() == tmp_path / "tinyllama" / "tuning.pkl"


def test_not_reading_still_writes(cache_file):
    store().persist({"tiles": {"k": complex(1, 1)}})
    s = store()
    s.read = False  # bench generate without --reuse-tuning: times every candidate, keeps its choices
    assert s.restore({"tiles": {}}) == 0
    s.persist({"tiles": {"j": complex(2, 2)}})
    got = {"tiles": {}}
    store().restore(got)
    assert set(got["tiles"]) == {"k", "j"}


def test_the_decode_steps_tables_round_trip_through_their_store(cache_file, monkeypatch):
    """The decode step's own store: its keys and choices (tiles, attention, persistent configurations, dtypes)
    are all types its unpickler builds, read back in a new process; the fingerprint names Triton and torch."""
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
    code = ("import pickle, sys\nfrom tinyllama.kernels import decode as D\n"
            "assert D.TUNING_STORE.restore(D._tuning_tables()) == 5\n"
            "sys.stdout.buffer.write(pickle.dumps((D._TUNED, D._TUNED_STEP)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, ENV: str(cache_file)})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert pickle.loads(out.stdout) == (tables["products and attention"], tables["whole step"])
