"""`tinyllama pretrain [--config FILE] [--out DIR] [--resume] [--key.sub value ...]`.

With no arguments it runs the embedded demo (recipe `demo`): prepares the demo corpus under
./out/data, trains `tinyllama-demo` on this machine, validates, checkpoints under ./out/demo,
exports a Hugging Face directory to ./out/demo/hf and prints a sample. Under torchrun it trains on
every process with FSDP2.
"""

from __future__ import annotations

ACCEPTS_OVERRIDES = True


def add_arguments(p) -> None:
    p.add_argument("--config", default=None,
                   help="run YAML, or a packaged recipe name (demo, tinyllama-1.1b, tinyllama-120m, "
                        "tinyllama-v1.1-stage1/2/3); default: demo")
    p.add_argument("--out", default=None, help="output directory (overrides train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.epilog = "Any field can be overridden: --optim.lr 3e-4 --train.max_steps 100 --model.preset tinyllama-120m"


def run(args) -> int:
    import torch

    from tinyllama.errors import TinyLlamaError
    from tinyllama.train.config import load_run_config
    from tinyllama.train.distributed import destroy_distributed

    overrides = list(getattr(args, "overrides", []) or [])
    if args.out:
        overrides += ["--train.out_dir", args.out]
    cfg = load_run_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from tinyllama.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
        result = trainer.run()
    except torch.OutOfMemoryError:
        from tinyllama.train.trainer import OOM_ADVICE

        raise TinyLlamaError(OOM_ADVICE) from None
    finally:
        destroy_distributed()
    if result.get("stopped_by") == "nonfinite":
        return 3
    return 0
