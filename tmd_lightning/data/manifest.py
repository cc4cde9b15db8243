"""Manifests: CSV or JSONL files of `path, caption` (+ optional num_frames, height, width, fps), UTF-8."""

from __future__ import annotations

import csv
import io
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


def _text(path: Path) -> str:
    """The manifest as text: UTF-8, with the byte-order mark a spreadsheet may write dropped. Other encodings and NUL
    characters are errors naming the line: they would otherwise turn into wrong captions or unopenable paths."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the manifest as UTF-8"
                            ) from exc
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ManifestError(f"{path}:{line}: a NUL character; a manifest is a text file of paths and captions")
    return text


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line, row) pairs of a CSV manifest, read strictly: a row is one line with exactly the header's fields, so an
    unterminated quote or a stray comma is an error naming its line instead of silently merged or shifted rows."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise ManifestError(f"{path}: empty manifest (no header)") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}:1: malformed header ({exc})") from exc
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"{path}: header {header} lacks column(s) {missing}")
    rows = []
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:
            raise ManifestError(f"{path}:{line}: malformed quote ({exc}); a quoted field must end with a quote "
                                "followed by a comma or the end of the line") from exc
        if reader.line_num > line:
            raise ManifestError(f"{path}:{line}: a quote opened here closes on line {reader.line_num} (an "
                                "unterminated quote?); every row must be on one line")
        if len(fields) <= 1 and not "".join(fields).strip():
            continue  # a blank line
        if len(fields) != len(header):
            raise ManifestError(f"{path}:{line}: {len(fields)} field(s), the header has {len(header)} "
                                f"({','.join(header)}); quote a caption that contains commas")
        rows.append((line, dict(zip(header, fields, strict=True))))


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line, row) pairs of a JSONL manifest: one JSON object per non-blank line."""
    rows = []
    for i, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{i}: each line must be a JSON object")
        rows.append((i, row))
    return rows


def _rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".csv":
        return _csv_rows(path, _text(path))
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, _text(path))
    raise ManifestError(f"{path}: unknown manifest format (use .csv or .jsonl)")


def _int_fields(path: Path, line: int, row: dict) -> dict[str, int]:
    """The optional integer columns of one row that are set."""
    extras = {}
    for key in OPTIONAL_INT:
        value = row.get(key)
        if value not in (None, ""):
            try:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)  # JSON 9.5 / true would otherwise pass int() silently
                extras[key] = int(value)
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"{path}:{line}: {key}={value!r} is not an integer") from exc
    return extras


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parses and validates a manifest; paths become absolute (relative to the manifest's folder).

    Missing files are *not* an error here (they are skipped and counted while loading); a manifest that is
    absent, empty, not UTF-8, or lacks/garbles a required field is, naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    entries = []
    for line, row in _rows(path):
        if row.get("path") in (None, ""):
            raise ManifestError(f"{path}:{line}: no path")
        caption = row.get("caption")
        caption = "" if caption is None else str(caption)
        if "\x00" in str(row["path"]) + caption:
            raise ManifestError(f"{path}:{line}: a NUL character in the path or caption")
        entries.append(ManifestEntry(path=(path.parent / str(row["path"])).resolve(), caption=caption,
                                     **_int_fields(path, line, row)))
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
