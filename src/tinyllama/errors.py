"""User-facing errors: one clear line, no traceback (the CLI catches these)."""


class TinyLlamaError(Exception):
    """A problem with the user's input (file, field, value) rather than a bug.

    The message must name the file/field/value and say what to do.
    """
