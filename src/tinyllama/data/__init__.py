"""Data pipeline: raw corpora -> packed token shards (`prepare`) -> a resumable weighted mixture loader."""

from tinyllama.data.config import DataConfig, ValLoader, build_train_loader, parse_sources, val_loader
from tinyllama.data.demo import ensure_demo_dataset
from tinyllama.data.mixture import MixtureLoader, Permutation
from tinyllama.data.prepare import prepare
from tinyllama.data.shards import Shard, TokenSource

__all__ = [
    "DataConfig", "MixtureLoader", "Permutation", "Shard", "TokenSource", "ValLoader", "build_train_loader",
    "ensure_demo_dataset", "parse_sources", "prepare", "val_loader",
]
