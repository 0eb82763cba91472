"""Where the repository's shipped data and default outputs live.

Paths come from the repository root (or an explicit ``--out``), never from a
pod-specific absolute path. ``EPS_DATA_DIR`` overrides the data directory for a
non-editable install.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    override = os.environ.get("EPS_DATA_DIR")
    path = Path(override) if override else REPO_ROOT / "data"
    if not (path / "questions.json").is_file():
        raise FileNotFoundError(
            f"shipped data not found in {path}; run from a checkout of the repository "
            "or set EPS_DATA_DIR to its data/ directory"
        )
    return path
