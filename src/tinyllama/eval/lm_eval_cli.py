"""Run lm-evaluation-harness's own command line with the "tinyllama" model registered.

    python -m tinyllama.eval.lm_eval_cli --model tinyllama --model_args pretrained=DIR --tasks hellaswag
"""

from __future__ import annotations

import sys

from tinyllama.errors import pip_extra


def main() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(f"error: lm-evaluation-harness is not installed; run `{pip_extra('eval')}`", file=sys.stderr)
        raise SystemExit(2)
    from lm_eval.__main__ import cli_evaluate

    import tinyllama.eval.lm_eval_adapter  # noqa: F401  (registers --model tinyllama)

    cli_evaluate()


if __name__ == "__main__":
    main()
