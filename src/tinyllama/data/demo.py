"""The embedded demo corpus (assets/corpus), prepared on first use into `data_root/demo-<fingerprint>/`."""

from __future__ import annotations

import fcntl
import hashlib
import json
from importlib import resources
from pathlib import Path

from tinyllama.data.shards import MANIFEST

DEMO_FILES = {"prose": "prose.jsonl.zst", "code": "code.parquet"}
# The demo corpus is small: hold out 2 % of documents so validation has a few dozen 2048-token blocks.
DEMO_VAL_FRACTION = 0.02
DEMO_SHARD_TOKENS = 1 << 20


def demo_corpus_dir() -> Path:
    return Path(str(resources.files("tinyllama") / "assets" / "corpus"))


def demo_inputs() -> dict[str, Path]:
    return {name: demo_corpus_dir() / f for name, f in DEMO_FILES.items()}


def ensure_demo_dataset(data_root: str | Path, workers: int = 2) -> dict[str, Path]:
    """Prepare the demo corpus under data_root once (idempotent, safe when all ranks call it at once)."""
    from tinyllama.data.prepare import _load_tokenizer, prepare, tokenizer_fingerprint

    tok = _load_tokenizer(None)
    h = hashlib.sha256(tokenizer_fingerprint(tok).encode())
    for name, p in sorted(demo_inputs().items()):
        h.update(f"{name}:{p.stat().st_size}:{DEMO_VAL_FRACTION}".encode())
    root = Path(data_root) / f"demo-{h.hexdigest()[:10]}"
    out = {name: root / name for name in DEMO_FILES}
    if all(_complete(p) for p in out.values()):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process prepares; the others wait, then find it done
        for name, path in out.items():
            if not _complete(path):
                prepare([demo_inputs()[name]], path, name=name, val_fraction=DEMO_VAL_FRACTION, workers=1,
                        tokenizer=tok, shard_tokens=DEMO_SHARD_TOKENS)
    return out


def _complete(path: Path) -> bool:
    try:
        return bool(json.loads((path / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError):
        return False
