"""Writing user-facing outputs: temporary name first, the umask's permissions, then a rename into place.

`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders (they must: the name is guessable
until it is renamed), and a rename keeps those modes, so a model exported that way would be private to
its owner. `publish_modes` gives such paths the modes an ordinary `open`/`mkdir` would have had under
the current umask (0644/0755 under umask 022), as `transformers` and every other tool produce.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    # Linux reports it in /proc; elsewhere read it by setting it, which is not thread-safe (another
    # thread creating a file in between, e.g. an async checkpoint writer, would get the temporary mask).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike) -> None:
    """chmod `path` (a file, or a folder and everything in it) to the umask's default modes."""
    path = Path(path)
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `target`; when the block succeeds it gets the umask's mode and is
    renamed onto `target`, when it fails it is deleted (the previous `target`, if any, is untouched)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_modes(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
