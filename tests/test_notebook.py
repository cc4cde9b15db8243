"""notebooks/inspect_samples: the `.ipynb` is the jupytext pair of the `.py`, and it executes top to bottom.

Executed in-process with nbclient (what `pytest --nbmake` does), with the repository root as working directory,
so the notebook picks the latest `distill`/`adapt_head` export under `logs/` when there is one. A second run from
an empty directory checks the fallback every fresh clone (and CI) takes: no checkpoints, the shipped teacher.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_samples"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_ipynb_is_in_sync_with_the_py():
    paired = jupytext.read(NOTEBOOK.with_suffix(".py"))
    stored = nbformat.read(NOTEBOOK.with_suffix(".ipynb"), as_version=4)
    assert _cells(stored) == _cells(paired), "run `jupytext --sync notebooks/inspect_samples.py`"
    code = [source for kind, source in _cells(stored) if kind == "code"]
    assert any("CHECKPOINT" in source for source in code)
    assert all(not cell.get("outputs") for cell in stored.cells if cell.cell_type == "code"), "commit it unexecuted"


def _execute(cwd: Path):
    """Runs the stored `.ipynb` in a fresh kernel started in `cwd` (the kernel finds `tmd_lightning` there, or the
    notebook adds the checkout it sits in to `sys.path`)."""
    nb = nbformat.read(NOTEBOOK.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _printed(nb) -> str:
    return "".join(out.get("text", "") for out in _outputs(nb) if out.get("output_type") == "stream")


def _check_executed(nb) -> str:
    outputs = _outputs(nb)
    assert not [out for out in outputs if out.get("output_type") == "error"]
    animations = [out for out in outputs if 'class="animation"' in out.get("data", {}).get("text/html", "")]
    assert len(animations) >= 2  # the sample grid and the side-by-side comparison
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the intermediate states
    printed = _printed(nb)
    assert "effective NFE" in printed and "s / video" in printed
    assert "teacher 50 steps CFG 5" in printed
    return printed


def test_notebook_executes_from_the_repository_root():
    """With this checkout's own checkpoints; without any (a fresh clone, CI) it would run exactly what the fallback
    test below runs, so the notebook is executed once there."""
    candidates = [ROOT / "logs/distill/latest/export/student", ROOT / "logs/adapt_head/latest/export/student"]
    if not any(p.exists() for p in candidates):
        pytest.skip("no distill / adapt_head export in this checkout: the fallback test executes the notebook")
    _check_executed(_execute(ROOT))


def test_notebook_falls_back_to_the_shipped_teacher_without_checkpoints(tmp_path):
    (tmp_path / "tmd_lightning").symlink_to(ROOT / "tmd_lightning", target_is_directory=True)  # ROOT := tmp_path
    printed = _check_executed(_execute(tmp_path))
    assert "sampler: TeacherSampler" in printed and "teacher 4 steps" in printed
