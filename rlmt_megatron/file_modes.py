"""File modes of what a run writes: those of a plain ``open()`` (0o666 less the umask).

``tempfile.mkstemp`` (behind the atomic writers) and safetensors' ``save_file`` create files
0600 whatever the umask, so results would be unreadable to a group that shares the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` sets
    it, and another thread creating a file in between would get the temporary value)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~current_umask()


def apply_default_mode(target: str | Path | int) -> None:
    """Give a file (a path, or an open descriptor) the mode a plain ``open()`` would have."""
    if isinstance(target, int):
        os.fchmod(target, default_file_mode())
    else:
        os.chmod(target, default_file_mode())
