"""Hugging Face Hub model ids (`org/name`, `org/name@revision`) wherever a model directory is accepted.

No network: the Hub cache is laid out from a local export exactly as `huggingface_hub` writes it
(models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}), checked
with huggingface_hub's own cache scanner, and every run is offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE=tmp).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.hub import resolve_model_path
from tinyllama.model import Llama
from tinyllama.tokenizer import Tokenizer

hub = pytest.importorskip("huggingface_hub")

REPO = "tiny-org/tiny-llama"
COMMIT = hashlib.sha1(b"tinyllama test commit").hexdigest()


def add_to_hub_cache(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put the files of `src` into a Hub cache as revision `ref` = `commit`; returns the snapshot directory."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # LFS files are stored under their sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(cache dir, the exported model dir it was built from)."""
    d = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tinyllama-tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a peaked distribution: greedy text differs between models
    model.save_pretrained(d / "export", tokenizer=Tokenizer())
    cache = d / "cache"
    add_to_hub_cache(cache, REPO, d / "export")
    return cache, d / "export"


@pytest.fixture
def offline(cached, monkeypatch):
    """In-process: huggingface_hub read its environment at import, so set its constants too."""
    cache, _ = cached
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_the_cache_layout_is_the_hubs(cached):
    cache, export = cached
    info = hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and [r.commit_hash for r in repo.revisions] == [COMMIT]
    assert {f.file_name for f in next(iter(repo.revisions)).files} == {p.name for p in export.iterdir()}
    found = hub.try_to_load_from_cache(REPO, "config.json", cache_dir=cache)
    assert found and Path(found).read_bytes() == (export / "config.json").read_bytes()


def test_resolver_finds_the_snapshot_by_id_and_revision(cached, offline):
    cache, export = cached
    snap = resolve_model_path(REPO)
    assert snap.is_dir() and snap.name == COMMIT and (snap / "model.safetensors").is_file()
    assert resolve_model_path(f"{REPO}@{COMMIT}") == snap
    assert resolve_model_path(f"{REPO}@main") == snap
    assert resolve_model_path(export) == export  # local paths as they are
    a, b = Llama.from_pretrained(REPO), Llama.from_pretrained(export)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name,msg", [
    ("tiny-org/not-there", r"not in the cache .*HF_HUB_OFFLINE is set.*`hf download tiny-org/not-there`"),
    (f"{REPO}@v9", rf"not in the cache .*`hf download {REPO} --revision v9`"),
    ("no/such/dir", "no/such/dir: model directory not found"),  # not an id: a local path, missing
    ("tiny-org/x@", "model directory not found"),
])
def test_missing_ids_are_one_line_errors_saying_how_to_download(offline, name, msg):
    with pytest.raises(TinyLlamaError, match=msg) as e:
        resolve_model_path(name)
    assert "\n" not in str(e.value)


def test_a_local_directory_of_that_name_wins(cached, offline, tmp_path, monkeypatch):
    torch.manual_seed(1)
    Llama(ModelConfig.from_name("tinyllama-tiny")).save_pretrained(tmp_path / REPO)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO) == Path(REPO)
    assert not torch.equal(Llama.from_pretrained(REPO).lm_head.weight, Llama.from_pretrained(cached[1]).lm_head.weight)


def _tinyllama(args, cache, cwd=None):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_HOME", None)
    return subprocess.run([sys.executable, "-m", "tinyllama", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_generate_takes_a_hub_id_and_a_missing_one_is_one_line(cached):
    cache, export = cached
    gen = ["generate", "--prompt", "The cat", "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]
    by_id = _tinyllama([*gen, "--model", REPO], cache)
    by_dir = _tinyllama([*gen, "--model", str(export)], cache)
    assert by_id.returncode == 0 and by_dir.returncode == 0, by_id.stderr[-2000:]
    assert by_id.stdout == by_dir.stdout and by_id.stdout.strip()
    missing = _tinyllama([*gen, "--model", "tiny-org/not-there"], cache)
    err = missing.stderr.strip()
    assert missing.returncode == 2 and len(err.splitlines()) == 1, missing.stderr
    assert err.startswith("error: tiny-org/not-there:") and "hf download tiny-org/not-there" in err


def test_every_model_taking_command_resolves_hub_ids(cached, offline, tmp_path, capsys):
    from tinyllama.cli import main
    from tinyllama.loading import load_checkpoint_or_hf, load_model_and_tokenizer
    from tinyllama.serve.server import ServeConfig

    _, export = cached
    snap = resolve_model_path(REPO)
    model, tok = load_model_and_tokenizer(REPO, device="cpu")  # generate, chat, serve, eval, bench serve
    assert tok.source_path is not None and Path(tok.source_path).parent == snap
    assert load_checkpoint_or_hf(REPO)[2] == f"Hugging Face directory {snap}"  # convert --checkpoint
    ServeConfig(model=REPO).validate()
    with pytest.raises(TinyLlamaError, match="not in the cache"):
        ServeConfig(model="tiny-org/not-there").validate()
    txt = tmp_path / "doc.txt"
    txt.write_text("the cat sat on the mat. " * 20)
    assert main(["eval", "--model", REPO, "--perplexity", str(txt)]) == 0
    assert main(["convert", "--checkpoint", REPO, "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    capsys.readouterr()


def test_sft_starts_from_a_hub_id(cached, offline, tmp_path):
    import json

    from tinyllama.finetune.trainer import finetune, load_finetune_config

    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add one to {i}.", "output": str(i + 1)}) + "\n"
                            for i in range(4)))
    cfg = load_finetune_config("sft", None, [], **{
        "model.path": REPO, "data.train": str(data), "train.out_dir": str(tmp_path / "o"), "data.seq_len": 64,
        "train.micro_batch": 2, "train.global_batch": 2, "train.max_steps": 1, "train.progress": False,
        "train.export_hf": None})
    assert len(finetune(cfg)["losses"]) == 1


def test_inference_device_and_dtype_is_one_rule_for_every_inference_command():
    from tinyllama.loading import inference_device_and_dtype

    if not torch.cuda.is_available():
        assert inference_device_and_dtype() == (torch.device("cpu"), torch.float32)
    assert inference_device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)  # weights cast: fp32 on CPU
    assert inference_device_and_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(TinyLlamaError, match="--device quantum"):
        inference_device_and_dtype("quantum")
