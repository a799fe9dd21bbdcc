"""The record's JSON files: written strictly and atomically (``write_json``), read through
``Reader``, whose every error is a ``DalaError`` naming the file and the key path.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dala_search.errors import DalaError


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Strict JSON (NaN refused: callers turn undefined values into null), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(doc, handle, indent=2, allow_nan=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the report reads it as anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Reader:
    """Typed access to one JSON object of a file; every error names the file and key path."""

    def __init__(self, data: Any, source: str, where: str = "") -> None:
        self.source, self.where = source, where
        if not isinstance(data, Mapping):
            raise self.error(f"expected a JSON object, found {type(data).__name__}")
        self.data = data

    def error(self, msg: str, key: str | None = None) -> DalaError:
        at = f"{self.where}{key}" if key is not None else self.where.rstrip(".")
        return DalaError(f"{self.source}: " + (f"key {at!r}: " if at else "") + msg)

    def only(self, *keys: str) -> None:
        extra = sorted(set(self.data) - set(keys))
        if extra:
            raise self.error(f"unknown key(s) {extra} (not written by this dala-search)")

    def get(self, key: str, kind: type | tuple[type, ...], *, null: bool = False) -> Any:
        if key not in self.data:
            raise self.error("missing (written by another dala-search version? run it again)", key)
        v = self.data[key]
        if v is None and null:
            return None
        ok = isinstance(v, kind) and not (isinstance(v, bool) and bool not in _tuple(kind))
        if not ok:
            want = " or ".join(t.__name__ for t in _tuple(kind)) + (" or null" if null else "")
            raise self.error(f"expected {want}, found {json.dumps(v)[:60]}", key)
        return v

    def number(self, key: str, *, null: bool = True) -> float | None:
        v = self.get(key, (int, float), null=null)
        if v is not None and not math.isfinite(v):
            raise self.error(f"expected a finite number, found {v}", key)
        return None if v is None else float(v)

    def child(self, key: str, data: Any) -> Reader:
        return Reader(data, self.source, f"{self.where}{key}.")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
