"""Manifests: CSV or JSONL files of `path, caption` (+ optional num_frames, height, width, fps) (DESIGN.md §7)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("path", "caption")
OPTIONAL_INT = ("num_frames", "height", "width", "fps")


class ManifestError(ValueError):
    """A manifest that cannot be used: missing, empty, or malformed. Raised at setup, before training."""


@dataclass(frozen=True)
class ManifestEntry:
    path: Path  # absolute
    caption: str
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int | None = None


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise ManifestError(f"{path}: empty manifest (no header)")
            missing = [c for c in REQUIRED if c not in reader.fieldnames]
            if missing:
                raise ManifestError(f"{path}: header {reader.fieldnames} lacks column(s) {missing}")
            return list(reader)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{i}: each line must be a JSON object")
            rows.append(row)
        return rows
    raise ManifestError(f"{path}: unknown manifest format (use .csv or .jsonl)")


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parses and validates a manifest; paths become absolute (relative to the manifest's folder).

    Missing files are *not* an error here (they are skipped and counted while loading); a manifest that is
    absent, empty, or lacks/garbles a required field is.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    entries = []
    for i, row in enumerate(_rows(path), start=2 if path.suffix == ".csv" else 1):
        missing = [c for c in REQUIRED if row.get(c) in (None, "")]
        if "path" in missing:
            raise ManifestError(f"{path}: row {i} has no path")
        extras = {}
        for key in OPTIONAL_INT:
            value = row.get(key)
            if value not in (None, ""):
                try:
                    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                        raise ValueError(value)  # JSON 9.5 / true would otherwise pass int() silently
                    extras[key] = int(value)
                except (TypeError, ValueError) as exc:
                    raise ManifestError(f"{path}: row {i}: {key}={value!r} is not an integer") from exc
        caption = row.get("caption")
        caption = "" if caption is None else str(caption)
        entries.append(ManifestEntry(path=(path.parent / str(row["path"])).resolve(), caption=caption, **extras))
    if not entries:
        raise ManifestError(f"{path}: empty manifest (no rows)")
    return entries


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Writes rows (`path` relative to the manifest) as CSV or JSONL, by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
