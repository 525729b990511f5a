"""`tinyllama serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine."""

from __future__ import annotations

import argparse
import logging

from tinyllama.config import config_from_args as load_from_args
from tinyllama.cli._args import add_device_arguments
from tinyllama.errors import TinyLlamaError, pip_extra
from tinyllama.serve.server import ServeConfig, build


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML file with serve options (flags given here override it)")
    p.add_argument("--model", help="Hugging Face model directory, or a Hub id org/name[@revision]")
    p.add_argument("--random-preset", metavar="NAME", help="serve a randomly initialised preset instead (smoke test)")
    p.add_argument("--model-name", help="model id clients use (default: the model directory's name)")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--max-batch-size", type=int, help="sequences decoded together (KV-cache slots), default 16")
    p.add_argument("--max-seq-len", type=int, help="context per sequence (default: the model's)")
    add_device_arguments(p)
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's choice)")
    p.add_argument("--max-request-bytes", type=int,
                   help="larger request bodies are refused with 413 before they are read (default 1 MiB)")
    p.add_argument("--prefill-in-decode", type=int, metavar="N",
                   help="prompts of up to N tokens that arrive while others run are fed through the running decode "
                        "steps, one token per step, instead of a prefill pass that stalls every running request "
                        "(0: never; default: 32 with --compile on CUDA, else 0); into an idle server, a prefill pass")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="queue each decode step before the previous step's tokens reach the host, so the host's "
                        "work (emitting, preparing the next step) runs while the GPU computes; a request that "
                        "stops early runs one step more (same tokens). Default: on with --compile on CUDA")
    p.add_argument("--log-level", help="uvicorn log level (default info)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="fuse the q/k/v and gate/up projections and, on CUDA, run decode steps compiled: one CUDA "
                        "graph per batch bucket (1, 2, 4, ... max-batch-size), buckets of up to 16 on the Triton decode step; "
                        "each bucket's first steps compile")


def config_from_args(args) -> ServeConfig:
    cfg = load_from_args(ServeConfig, args)
    cfg.validate()
    return cfg


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise TinyLlamaError(f"tinyllama serve needs FastAPI and uvicorn: {pip_extra('serve')}") from None
    cfg = config_from_args(args)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO))
    app, engine = build(cfg)
    engine.start()
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        engine.stop()
    return 0
