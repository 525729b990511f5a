"""Shared command-line handling of `tinyllama sft` and `tinyllama dpo`."""

from __future__ import annotations

from typing import Optional


def add_common_arguments(p, kind: str) -> None:
    p.add_argument("--config", help="YAML with sections model, data, train, optim, lora, dpo")
    p.add_argument("--model", help="Hugging Face model directory or Hub id org/name to start from (model.path)")
    p.add_argument("--data", help="training JSONL (data.train): " + (
        "one {\"messages\": [...]} conversation per line" if kind == "sft" else
        "one {\"prompt\", \"chosen\", \"rejected\"} per line"))
    p.add_argument("--val-data", help="held-out JSONL (data.val; default: data.val_fraction of --data)")
    p.add_argument("--out", help="output directory (train.out_dir)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base (lora.enabled)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="keep the frozen base quantized (implies --lora)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.epilog = "Any field can be overridden: --optim.lr 1e-4 --train.micro_batch 2 --lora.r 16 --data.seq_len 1024"


def run_common(args, kind: str, extra: Optional[dict] = None) -> int:
    from tinyllama.finetune.trainer import finetune, load_finetune_config
    from tinyllama.train.distributed import destroy_distributed

    direct = {"model.path": args.model, "data.train": args.data, "data.val": args.val_data, "train.out_dir": args.out,
              "train.max_steps": args.max_steps, **(extra or {})}
    if args.lora or args.quantize:
        direct["lora.enabled"] = True
    if args.quantize:
        direct["lora.quantize"] = args.quantize
    cfg = load_finetune_config(kind, args.config, list(getattr(args, "overrides", []) or []), **direct)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        finetune(cfg, resume=args.resume)
    finally:
        destroy_distributed()
    return 0
