"""User-facing errors: one clear line, no traceback (the CLI catches these)."""

import json


class TinyLlamaError(Exception):
    """A problem with the user's input (file, field, value) rather than a bug.

    The message must name the file/field/value and say what to do.
    """


def json_error_text(e: Exception, line: bool = True) -> str:
    """A JSON decoding error as message text: 'Expecting value at line 1 column 10', or with line=False (the
    caller names the line) 'Unterminated string starting at column 10'. json's own messages can end in
    'at' ('... starting at'), so the position is not simply appended after ' at'."""
    if not isinstance(e, json.JSONDecodeError):
        return str(e)
    where = f"line {e.lineno} column {e.colno}" if line else f"column {e.colno}"
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"
