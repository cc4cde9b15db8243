"""Packaging and documentation consistency: license, console scripts, dependency markers, docs/method.md's references,
`make help`. Reads files only (and imports the package); nothing is built or installed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
METHOD = ROOT / "docs" / "method.md"
# the first two lines of each license's standard text, by SPDX identifier
LICENSE_HEADINGS = {"Apache-2.0": ("Apache License", "Version 2.0")}
# `tmd_lightning.module.function` (or `.Class.method`) in backticks: docs/method.md's "implemented by" references
REFERENCE = re.compile(r"`(tmd_lightning(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
# docs/method.md §N (or §N-M, §N-§M) as the code, configs and README cite it
SECTION_CITATION = re.compile(r"docs/method\.md §(\d+)(?:\s*-\s*§?(\d+))?")


def resolve(dotted: str) -> object:
    """The object a dotted name refers to: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_license_file_matches_the_metadata():
    license_id = PYPROJECT["project"]["license"]
    assert isinstance(license_id, str), "use an SPDX expression: license = \"Apache-2.0\""
    assert license_id in LICENSE_HEADINGS, f"no known heading for {license_id!r}"
    assert "LICENSE" in PYPROJECT["project"]["license-files"]
    lines = [line.strip() for line in (ROOT / "LICENSE").read_text(encoding="utf-8").splitlines() if line.strip()]
    title, version = LICENSE_HEADINGS[license_id]
    assert lines[0] == title
    assert lines[1].startswith(version)
    assert "END OF TERMS AND CONDITIONS" in lines  # the full text, not a stub


def test_project_urls_point_at_the_repository():
    urls = PYPROJECT["project"]["urls"]
    assert set(urls) >= {"Homepage", "Documentation", "Changelog", "Issues"}
    assert all(url.startswith("https://github.com/tmd-lightning/tmd_lightning") for url in urls.values())


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_script_resolves_to_a_callable(script):
    module, _, attribute = PYPROJECT["project"]["scripts"][script].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_every_console_script_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [s for s in PYPROJECT["project"]["scripts"] if f"`{s}`" not in readme] == []


def _requirement(name: str):
    requirements = pytest.importorskip("packaging.requirements")
    found = [requirements.Requirement(spec) for spec in PYPROJECT["project"]["dependencies"]]
    matches = [req for req in found if req.name == name]
    assert len(matches) == 1, f"{name} is listed {len(matches)} times"
    return matches[0]


def test_decord_is_required_only_where_it_has_wheels():
    decord = _requirement("decord")
    assert decord.marker is not None, "decord 0.6 has wheels for manylinux x86_64 and win amd64 only"
    has_wheels = [("linux", "x86_64"), ("win32", "AMD64")]
    no_wheels = [("linux", "aarch64"), ("darwin", "arm64"), ("darwin", "x86_64")]
    for platform, machine in has_wheels + no_wheels:
        expected = (platform, machine) in has_wheels
        assert decord.marker.evaluate({"sys_platform": platform, "platform_machine": machine}) == expected


def test_dev_extra_can_execute_the_notebook():
    """`jupytext --execute` runs notebooks through nbconvert, which jupytext does not install itself."""
    dev = {spec.split(">")[0].split("=")[0].split(";")[0].strip() for spec in
           PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert {"jupytext", "nbconvert", "ipykernel"} <= dev


def test_scipy_is_not_a_runtime_dependency():
    """Only the tests use scipy; the package must import without it."""
    assert not [spec for spec in PYPROJECT["project"]["dependencies"] if spec.startswith("scipy")]
    assert [spec for spec in PYPROJECT["project"]["optional-dependencies"]["dev"] if spec.startswith("scipy")]
    uses = [p for p in (ROOT / "tmd_lightning").rglob("*.py") if re.search(r"^\s*(import|from) scipy", p.read_text(
        encoding="utf-8"), re.M)]
    assert uses == []


def test_method_references_resolve():
    text = METHOD.read_text(encoding="utf-8")
    references = sorted(set(REFERENCE.findall(text)))
    assert len(references) > 40  # the page names the implementing function of every equation
    unresolved = []
    for dotted in references:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as exc:
            unresolved.append(f"{dotted}: {exc}")
    assert unresolved == []


def _cited_sections() -> dict[int, list[str]]:
    cited: dict[int, list[str]] = {}
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "notebooks" / "inspect_samples.py"]
    for folder, pattern in (("tmd_lightning", "*.py"), ("configs", "*.yaml"), ("benchmarks", "*.py"),
                            ("tests", "*.py")):
        files += sorted((ROOT / folder).rglob(pattern))
    for path in files:
        for match in SECTION_CITATION.finditer(path.read_text(encoding="utf-8")):
            first, last = int(match[1]), int(match[2] or match[1])
            for number in range(first, last + 1):
                cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    return cited


def test_cited_method_sections_exist():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", METHOD.read_text(encoding="utf-8"), re.M)}
    assert sections == set(range(1, 10))
    cited = _cited_sections()
    assert cited, "nothing cites docs/method.md"
    assert {n: files for n, files in cited.items() if n not in sections} == {}


def test_shipped_files_do_not_cite_the_internal_design_doc():
    """Users have docs/method.md, not the design document the project was built against."""
    needle = "DES" "IGN" ".md"  # split, so that this file does not match itself (nor a grep for the name)
    text_suffixes = {".py", ".yaml", ".md", ".ipynb", ".json", ".txt", ".csv"}
    files = [ROOT / name for name in ("README.md", "Makefile", "CHANGELOG.md")]
    for folder in ("tmd_lightning", "configs", "benchmarks", "notebooks", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in text_suffixes]
    offenders = [str(p.relative_to(ROOT)) for p in files if needle in p.read_text(encoding="utf-8", errors="replace")]
    assert offenders == []


def test_make_help_describes_every_target():
    """`make help` lists the targets from their `## ` comments; every phony target has one."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony is not None and "help" in phony[1].split()
    described = set(re.findall(r"^([A-Za-z0-9_-]+):[^#\n]*## ", makefile, re.M))
    assert set(phony[1].split()) - described == set()


def test_changelog_has_the_released_version_and_its_links():
    """Keep a Changelog: an [Unreleased] section, a dated section for the version in pyproject, link definitions."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    version = PYPROJECT["project"]["version"]
    assert re.search(r"^## \[Unreleased\]$", text, re.M)
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)
    repo = PYPROJECT["project"]["urls"]["Homepage"]
    assert f"[Unreleased]: {repo}/compare/v{version}...HEAD" in text
    assert f"[{version}]: {repo}/releases/tag/v{version}" in text
