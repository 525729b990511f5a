"""Building the server: its configuration (`ServeConfig`) and the app + engine for one (`build`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tinyllama.checks import NONNEGATIVE_INT, POSITIVE_INT, check_device, check_fields
from tinyllama.errors import TinyLlamaError
from tinyllama.hub import check_model_dir

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: a full 2048-token context is ~10 kB of text


@dataclass
class ServeConfig:
    model: Optional[str] = None  # Hugging Face model directory
    random_preset: Optional[str] = None  # or a randomly initialised preset (smoke tests)
    model_name: Optional[str] = None  # the id clients pass as "model" (default: the directory's name)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16  # KV-cache slots = sequences decoded together
    max_seq_len: Optional[int] = None  # cache length per slot (default: the model's context)
    device: Optional[str] = None
    dtype: Optional[str] = None
    threads: Optional[int] = None  # CPU threads for torch (default: torch's); fewer beats oversubscribed cores
    compile: bool = False  # fused projections; on CUDA, decode steps as CUDA graphs per batch bucket
    # prompts of up to this many tokens ride along in decode steps (0: never; default: 32 when compiled on CUDA)
    prefill_in_decode: Optional[int] = None
    # queue each decode step before reading the previous step's tokens (engine.py; default: on when compiled on CUDA)
    overlap: Optional[bool] = None
    log_level: str = "info"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger request bodies get 413 before they are read

    def validate(self) -> None:
        if not self.model and not self.random_preset:
            raise TinyLlamaError("serve: missing --model DIR (a Hugging Face model directory) or --random-preset NAME")
        if self.model:
            check_model_dir(self.model)  # a Hub id `org/name` too; a file or a training run is named as such
        check_fields(self, "serve: {}", as_flags=True, port=dict(integer=True, lo=1, hi=65535),
                     max_batch_size=POSITIVE_INT, threads=dict(POSITIVE_INT, none_ok=True),
                     max_seq_len=dict(integer=True, lo=2, none_ok=True), max_request_bytes=POSITIVE_INT,
                     prefill_in_decode=dict(NONNEGATIVE_INT, none_ok=True))
        check_device(self.device, "serve: --device")



def build(cfg: ServeConfig):
    """(app, engine) for a config: loads the model, builds the engine (not yet started) and the app."""
    from tinyllama.loading import load_model_and_tokenizer
    from tinyllama.serve.app import create_app
    from tinyllama.serve.engine import Engine

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.random_preset, cfg.device, cfg.dtype)
    name = cfg.model_name or (Path(cfg.model).resolve().name if cfg.model else cfg.random_preset)
    engine = Engine(model, max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len, eos_id=tokenizer.eos_id,
                    compile=cfg.compile, fuse=cfg.compile, prefill_in_decode=cfg.prefill_in_decode,
                    overlap=cfg.overlap)
    if engine.compile:
        logging.getLogger("tinyllama.serve").warning("compiled decode steps for batch buckets %s in %.0f s",
                                                     engine.decode_buckets, engine.warmup())
    return create_app(engine, tokenizer, name, cfg.max_request_bytes), engine
