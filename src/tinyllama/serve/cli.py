"""`tinyllama serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from tinyllama.config import dataclass_from_dict, read_yaml_mapping
from tinyllama.errors import TinyLlamaError


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
    log_level: str = "info"

    def validate(self) -> None:
        if not self.model and not self.random_preset:
            raise TinyLlamaError("serve: missing --model DIR (a Hugging Face model directory) or --random-preset NAME")
        if self.model and not Path(self.model).is_dir():
            raise TinyLlamaError(f"serve: --model {self.model}: model directory not found")
        if not 0 < self.port < 65536:
            raise TinyLlamaError(f"serve: --port must be in 1..65535, got {self.port}")
        if self.max_batch_size < 1:
            raise TinyLlamaError(f"serve: --max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise TinyLlamaError(f"serve: --threads must be >= 1, got {self.threads}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise TinyLlamaError(f"serve: --max-seq-len must be >= 2, got {self.max_seq_len}")

    @classmethod
    def from_yaml(cls, path) -> "ServeConfig":
        return dataclass_from_dict(cls, read_yaml_mapping(path, "a mapping of serve options"), f"{path}")


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML file with serve options (flags given here override it)")
    p.add_argument("--model", help="Hugging Face model directory (config.json + safetensors + tokenizer)")
    p.add_argument("--random-preset", metavar="NAME", help="serve a randomly initialised preset instead (smoke test)")
    p.add_argument("--model-name", help="model id clients use (default: the model directory's name)")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--max-batch-size", type=int, help="sequences decoded together (KV-cache slots), default 16")
    p.add_argument("--max-seq-len", type=int, help="context per sequence (default: the model's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's choice)")
    p.add_argument("--log-level", help="uvicorn log level (default info)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="fuse the q/k/v and gate/up projections and, on CUDA, run decode steps compiled: one CUDA "
                        "graph per batch bucket (1, 2, 4, ... max-batch-size), batch 1 on the Triton decode step; "
                        "each bucket's first steps compile")


def config_from_args(args) -> ServeConfig:
    cfg = ServeConfig.from_yaml(args.config) if getattr(args, "config", None) else ServeConfig()
    for f in fields(ServeConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    cfg.validate()
    return cfg


def build(cfg: ServeConfig):
    """(app, engine) for a config: loads the model, builds the engine (not yet started) and the app."""
    from tinyllama.commands.generate import load_model_and_tokenizer
    from tinyllama.serve.app import create_app
    from tinyllama.serve.engine import Engine

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.random_preset, cfg.device, cfg.dtype)
    name = cfg.model_name or (Path(cfg.model).resolve().name if cfg.model else cfg.random_preset)
    engine = Engine(model, max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len, eos_id=tokenizer.eos_id,
                    compile=cfg.compile, fuse=cfg.compile)
    return create_app(engine, tokenizer, name), engine


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise TinyLlamaError("tinyllama serve needs FastAPI and uvicorn: pip install 'tinyllama[serve]'") from None
    cfg = config_from_args(args)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO))
    app, engine = build(cfg)
    engine.start()
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        engine.stop()
    return 0
