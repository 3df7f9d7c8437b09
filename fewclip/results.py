"""One `results.json` per run: schema version, status, resolved config, metrics, timings,
provenance.

Written atomically (temporary file + rename), so a reader sees a whole file or none.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from fewclip.files import write_atomic_bytes

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
COMPLETE, FAILED, DIVERGED, RUNNING = "complete", "failed", "diverged", "running"
PACKAGES = (
    "torch", "torchvision", "open_clip_torch", "timm", "transformers", "yacs", "numpy",
    "scikit-learn",
)  # fmt: skip


def write_results(run_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write `payload` (plus the schema version) as the run's results.json."""
    path = Path(run_dir) / RESULTS_FILE
    data = {"schema_version": SCHEMA_VERSION, **payload}
    write_atomic_bytes(
        path, (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    )
    return path


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's results, or None when the file is missing or unreadable (never half-written)."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(run_dir: str | Path) -> bool:
    results = read_results(run_dir)
    return results is not None and results.get("status") == COMPLETE


@functools.lru_cache(maxsize=1)
def collect_provenance() -> dict[str, Any]:
    """Code version (git commit and dirty flag), package versions, Python and platform."""
    root = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        dirty = bool(status.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git here, or not a checkout: provenance records None
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
