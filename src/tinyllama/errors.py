"""User-facing errors: one clear line, no traceback (the CLI catches these)."""

import json


# The name on the package index: `tinyllama` there is an unrelated project, so `pip install tinyllama`
# would install the wrong thing. The import name and the command stay `tinyllama`.
DISTRIBUTION = "tinyllama-forge"


def pip_extra(extra: str) -> str:
    """The install command for one of this package's extras, as error messages name it."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


class TinyLlamaError(Exception):
    """A problem with the user's input (file, field, value) rather than a bug.

    The message must name the file/field/value and say what to do.
    """


def fused_projections_error(purpose: str) -> TinyLlamaError:
    """The one message for a model fused by `Llama.fuse_projections` (inference only) used where the separate
    q/k/v and gate/up weights are needed: saving, exports, LoRA, the training kernels."""
    return TinyLlamaError(
        f"{purpose} needs separate q/k/v and gate/up weights, but this model's were fused for inference "
        "(fuse_projections); use the model before fusing it, or reload it from its checkpoint"
    )


def json_error_text(e: Exception, line: bool = True) -> str:
    """A JSON decoding error as message text: 'Expecting value at line 1 column 10', or with line=False (the
    caller names the line) 'Unterminated string starting at column 10'. json's own messages can end in
    'at' ('... starting at'), so the position is not simply appended after ' at'."""
    if not isinstance(e, json.JSONDecodeError):
        return str(e)
    where = f"line {e.lineno} column {e.colno}" if line else f"column {e.colno}"
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"
