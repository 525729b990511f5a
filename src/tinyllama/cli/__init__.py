"""`tinyllama` command line: this package holds one module per subcommand (`tinyllama.cli.<command>`), each
only parsing arguments and calling the library; this file only dispatches.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; if it also sets
`ACCEPTS_OVERRIDES = True`, unknown `--key.sub value` pairs are passed on as `args.overrides`.
User errors (bad flags, TinyLlamaError, missing files) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tinyllama import __version__

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("tinyllama.cli.generate", "generate text from a model directory"),
    "prepare": ("tinyllama.cli.prepare", "tokenize raw corpora into packed token shards"),
    "pretrain": ("tinyllama.cli.pretrain", "pretrain a model (default: the embedded demo on this machine)"),
    "convert": ("tinyllama.cli.convert", "convert a training checkpoint to Hugging Face or GGUF"),
    "chat": ("tinyllama.cli.chat", "interactive chat in the terminal"),
    "eval": ("tinyllama.cli.eval", "perplexity and multiple-choice benchmarks"),
    "sft": ("tinyllama.cli.sft", "supervised fine-tuning on chat data"),
    "dpo": ("tinyllama.cli.dpo", "direct preference optimisation"),
    "serve": ("tinyllama.cli.serve", "OpenAI-compatible HTTP server"),
    "bench": ("tinyllama.cli.bench", "benchmarks: train step, generation, data"),
}


class _SubcommandParser(argparse.ArgumentParser):
    """A bad or missing flag is a user error like any other: one line naming the flag and exit 2 (argparse
    would print its usage too and raise SystemExit). Nested parsers (`bench train`) are of this class too."""

    def error(self, message: str):
        from tinyllama.errors import TinyLlamaError

        raise TinyLlamaError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllama",
        description="Pretrain, evaluate, fine-tune and ship Llama-2-compatible small language models.",
    )
    parser.add_argument("--version", action="version", version=f"tinyllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tinyllama.errors import TinyLlamaError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # handles --help/--version/unknown command
        parser.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = _SubcommandParser(prog=f"tinyllama {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    try:
        if getattr(module, "ACCEPTS_OVERRIDES", False):
            args, rest = sub.parse_known_args(argv[1:])
            args.overrides = rest
        else:
            args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except TinyLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e.filename or e}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: exit quietly.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
