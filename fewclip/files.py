"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Kept free of torch and numpy so that the paths that only write text (aggregation, reports,
manifests) stay light to import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic_bytes(path: Path, data: bytes, folder: Path | None = None) -> None:
    """Write a temporary file in the same folder, then os.replace: never half a file."""
    folder = folder or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        try:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:  # a full disk (or a kill signal) leaves no temporary behind
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)
