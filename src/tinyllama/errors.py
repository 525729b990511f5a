"""User-facing errors: one clear line, no traceback (the CLI catches these)."""


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
