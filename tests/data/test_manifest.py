"""Manifests (docs/method.md §7): CSV / JSONL parsing, path resolution, and clear errors on bad manifests."""

from __future__ import annotations

import json

import pytest

from tmd_lightning.data.manifest import ManifestEntry, ManifestError, read_manifest, write_manifest


def test_csv_parse_and_relative_paths(tmp_path):
    folder = tmp_path / "sub"
    folder.mkdir()
    manifest = folder / "m.csv"
    manifest.write_text(
        "path,caption,num_frames,height,width,fps\n"
        "videos/a.mp4,a red square moving left,9,16,16,8\n"
        '../b.mp4,"a caption, with a comma",,,,\n'
        f"{tmp_path / 'abs.mp4'},third,17,32,48,24\n"
    )
    entries = read_manifest(manifest)
    assert len(entries) == 3
    a, b, c = entries
    assert a == ManifestEntry(
        path=(folder / "videos/a.mp4").resolve(),
        caption="a red square moving left",
        num_frames=9,
        height=16,
        width=16,
        fps=8,
    )
    assert a.path.is_absolute()
    assert b.path == (tmp_path / "b.mp4").resolve()  # relative to the manifest folder, not the cwd
    assert b.caption == "a caption, with a comma"
    assert (b.num_frames, b.height, b.width, b.fps) == (None, None, None, None)
    assert c.path == (tmp_path / "abs.mp4").resolve()  # absolute paths stay as they are
    assert (c.num_frames, c.height, c.width, c.fps) == (17, 32, 48, 24)
    assert isinstance(c.num_frames, int)


def test_csv_without_optional_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("caption,path\nhello,x.mp4\n")  # column order does not matter
    (entry,) = read_manifest(manifest)
    assert entry.path == (tmp_path / "x.mp4").resolve()
    assert entry.caption == "hello"
    assert entry.num_frames is None and entry.fps is None


def test_paths_resolve_against_manifest_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "m.csv"
    manifest.write_text("path,caption\nclip.mp4,c\n")
    monkeypatch.chdir(tmp_path)
    (entry,) = read_manifest("data/m.csv")
    assert entry.path == (tmp_path / "data" / "clip.mp4").resolve()


def test_jsonl_parse(tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"path": "a.mp4", "caption": "first", "num_frames": 9, "height": 16, "width": 16, "fps": 8},
        {"path": "sub/b.mp4", "caption": "second", "num_frames": "13"},  # string ints are accepted
        {"path": "c.mp4", "caption": "third", "extra": [1, 2]},  # unknown keys are ignored
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    entries = read_manifest(manifest)
    assert [e.caption for e in entries] == ["first", "second", "third"]
    assert entries[0].path == (tmp_path / "a.mp4").resolve()
    assert entries[1].path == (tmp_path / "sub" / "b.mp4").resolve()
    assert (entries[0].num_frames, entries[0].height, entries[0].width, entries[0].fps) == (9, 16, 16, 8)
    assert entries[1].num_frames == 13 and entries[1].height is None
    assert entries[2].num_frames is None


def test_empty_caption_is_kept_for_the_loader(tmp_path):
    """Empty captions are not a manifest error; the loader skips and counts them."""
    manifest = tmp_path / "m.csv"
    manifest.write_text('path,caption\na.mp4,""\nb.mp4,ok\n')
    entries = read_manifest(manifest)
    assert [e.caption for e in entries] == ["", "ok"]


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


def test_manifest_error_is_a_value_error():
    assert issubclass(ManifestError, ValueError)


MALFORMED = [  # (file name, content, what the error must say)
    ("m.csv", "", "empty"),
    ("m.csv", "path,caption\n", "no rows"),
    ("m.jsonl", "\n\n", "empty"),
    ("m.csv", "path,caption\na.mp4,ok\n,no path here\n", r"m\.csv:3: no path"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "ok"}\n{"path": "b.mp4", "caption": \n', r"m\.jsonl:2: not valid JSON"),
    ("m.jsonl", '["a.mp4", "caption"]\n', "JSON object"),
    ("m.jsonl", '{"caption": "no path"}\n', "no path"),
]


@pytest.mark.parametrize(("name", "content", "message"), MALFORMED)
def test_malformed_manifest_is_a_clear_error(tmp_path, name, content, message):
    manifest = tmp_path / name
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest)


@pytest.mark.parametrize("header", ["path,text", "file,caption", "caption"])
def test_csv_lacking_required_column(tmp_path, header):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{header}\n" + ",".join(["x"] * len(header.split(","))) + "\n")
    with pytest.raises(ManifestError, match="lacks column"):
        read_manifest(manifest)


@pytest.mark.parametrize("value", ["nine", "9.5", "1e3"])
def test_non_integer_num_frames_csv(tmp_path, value):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,caption,num_frames\na.mp4,ok,9\nb.mp4,ok,{value}\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: num_frames=.* is not an integer"):
        read_manifest(manifest)


@pytest.mark.parametrize("value", [[9], "nine", 9.5, True])
def test_non_integer_num_frames_jsonl(tmp_path, value):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "ok", "num_frames": value}) + "\n")
    with pytest.raises(ManifestError, match="num_frames"):
        read_manifest(manifest)


def test_integral_json_float_is_accepted(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "ok", "num_frames": 9.0}) + "\n")
    (entry,) = read_manifest(manifest)
    assert entry.num_frames == 9 and isinstance(entry.num_frames, int)


def test_non_integer_height(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption,height\na.mp4,ok,tall\n")
    with pytest.raises(ManifestError, match="height"):
        read_manifest(manifest)


# the CSV a spreadsheet writes, and CSV mistakes that must not pass silently


def test_csv_with_bom_and_crlf_loads(tmp_path):
    manifest = tmp_path / "m.csv"
    text = 'path,caption,num_frames\r\na.mp4,un carré rouge,9\r\nb.mp4,"x, y",5\r\n'
    manifest.write_bytes(text.encode("utf-8-sig"))
    entries = read_manifest(manifest)
    assert [(e.path.name, e.caption, e.num_frames) for e in entries] == [
        ("a.mp4", "un carré rouge", 9), ("b.mp4", "x, y", 5)]


def test_jsonl_with_bom_and_crlf_loads(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes('{"path": "a.mp4", "caption": "one"}\r\n{"path": "b.mp4", "caption": "two"}\r\n'
                         .encode("utf-8-sig"))
    assert [e.caption for e in read_manifest(manifest)] == ["one", "two"]


@pytest.mark.parametrize("content", [
    'path,caption\na.mp4,"an unterminated quote\nb.mp4,second row\nc.mp4,third row\n',  # runs to the end
    'path,caption\na.mp4,"quote\nb.mp4,second row"\nc.mp4,third\n',  # closed on a later line: rows merge
    'path,caption\na.mp4,"quote" then text\n',
])
def test_csv_unterminated_quote_is_an_error_naming_the_line(tmp_path, content):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=r"m\.csv:2: .*quote"):
        read_manifest(manifest)


@pytest.mark.parametrize(("row", "count"), [("a.mp4,one,extra", 3), ("a.mp4", 1)])
def test_csv_row_must_have_the_header_fields(tmp_path, row, count):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,caption\nz.mp4,fine\n{row}\n")
    with pytest.raises(ManifestError, match=rf"m\.csv:3: {count} field\(s\), the header has 2"):
        read_manifest(manifest)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_manifest_is_an_error_naming_the_line(tmp_path, suffix):
    manifest = tmp_path / f"m{suffix}"
    good, bad = ("path,caption\na.mp4,ok\n", "b.mp4,caf\xe9\n") if suffix == ".csv" else (
        '{"path": "a.mp4", "caption": "ok"}\n', '{"path": "b.mp4", "caption": "caf\xe9"}\n')
    manifest.write_bytes(good.encode() + bad.encode("latin-1"))
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(ManifestError, match=rf"m\{suffix}:{line}: not UTF-8"):
        read_manifest(manifest)


@pytest.mark.parametrize(("suffix", "content", "line"), [
    (".csv", "path,caption\na.mp4,ok\nb\x00.mp4,nul\n", 3),
    (".jsonl", '{"path": "a.mp4", "caption": "ok"}\n{"path": "b\\u0000.mp4", "caption": "nul"}\n', 2),
])
def test_nul_in_a_path_is_an_error_naming_the_line(tmp_path, suffix, content, line):
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=rf"m\{suffix}:{line}: .*NUL"):
        read_manifest(manifest)


def test_unknown_suffix(tmp_path):
    manifest = tmp_path / "m.txt"
    manifest.write_text("path,caption\na.mp4,ok\n")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(manifest)


# ---------------------------------------------------------------------------------------------------- writing


ROWS = [
    {
        "path": "videos/a.mp4",
        "caption": "a red square moving left",
        "num_frames": 9,
        "height": 16,
        "width": 16,
        "fps": 8,
    },
    {"path": "b.mp4", "caption": 'quotes " and, commas', "num_frames": 17, "height": 32, "width": 32, "fps": 24},
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_write_manifest_round_trip(tmp_path, suffix):
    path = write_manifest(tmp_path / "nested" / f"m{suffix}", ROWS)
    assert path.is_file()
    entries = read_manifest(path)
    assert len(entries) == len(ROWS)
    for entry, row in zip(entries, ROWS, strict=True):
        assert entry.path == (path.parent / row["path"]).resolve()
        assert entry.caption == row["caption"]
        assert (entry.num_frames, entry.height, entry.width, entry.fps) == (
            row["num_frames"],
            row["height"],
            row["width"],
            row["fps"],
        )


def test_write_manifest_csv_union_of_columns(tmp_path):
    rows = [{"path": "a.mp4", "caption": "one"}, {"path": "b.mp4", "caption": "two", "num_frames": 5}]
    entries = read_manifest(write_manifest(tmp_path / "m.csv", rows))
    assert [e.num_frames for e in entries] == [None, 5]
