"""Cheap facts about a model source, for the workflow at parse time (no torch import here)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_fingerprint(source: str) -> str | None:
    """Names, sizes and modification times of a local model source: a changed local model reruns the pipeline."""
    if source.startswith(("hf:", "pypi:")):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
