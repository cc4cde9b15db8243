"""Writing an evaluation's results (`tmd_lightning.evaluation.report`): the Pareto front and the Pareto plot."""

from __future__ import annotations

import itertools

from tmd_lightning.evaluation import pareto_figure, pareto_front


def test_pareto_front_against_brute_force():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3.5), (5, 1), (0.5, 9)]
    front = set(pareto_front(points))

    def dominated(i: int) -> bool:
        x, y = points[i]
        return any(a <= x and b <= y and (a, b) != (x, y) for a, b in points)

    assert front == {i for i in range(len(points)) if not dominated(i)} == {0, 1, 3, 6}
    for i, j in itertools.combinations(front, 2):  # no front point dominates another
        assert not (points[i][0] <= points[j][0] and points[i][1] <= points[j][1])


def _rows() -> list[dict]:
    rows = []

    def add(model: str, sampler: str, nfe: float, fd: float) -> None:
        rows.append({"model": model, "sampler": sampler, "effective_nfe": nfe, "seconds_per_video": nfe / 100,
                     "toy_fd": fd})

    for steps, fd in ((50, 0.1), (1, 2.0), (2, 1.0)):
        add("teacher", f"Euler {steps} x CFG 5", 2 * steps, fd)
    add("teacher", "Euler 2, no CFG", 2, 1.5)
    for model, shift in (("TMD, Stage 1 only", 0.3), ("TMD", 0.0)):
        for m, n in ((1, 2), (2, 2), (2, 4)):
            add(model, f"TMD M={m} N={n}", m * (1 + (n - 1) / 2), 1 / (m * n) + shift)
    for m in (1, 2, 4):
        add("DMD2-v", f"few-step M={m}", m, 1 / m)
    add("KD warm-up", "few-step M=1", 1, 1.2)
    return rows


def test_pareto_plot_families_lines_and_log_ticks() -> None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(_rows(), "toy_fd")
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_gid() and ln.get_gid() != "Pareto front"]
    style = {}
    for line in lines:
        family = line.get_gid().split("|")[0]
        style.setdefault(family, set()).add((line.get_color(), line.get_marker()))
    assert all(len(s) == 1 for s in style.values())  # one colour and marker per family ...
    pairs = [next(iter(s)) for s in style.values()]
    assert len(style) == 5 and len(set(pairs)) == 5  # ... and no two families share them
    assert len({c for c, _ in pairs}) == 5 and len({m for _, m in pairs}) == 5
    dmd = [ln for ln in lines if ln.get_gid().startswith("DMD2-v|")]
    assert len(dmd) == 1 and list(dmd[0].get_xdata()) == [1, 2, 4]  # one line over its step counts
    euler = [ln for ln in lines if ln.get_gid() == "teacher|Euler x CFG 5"]
    assert len(euler) == 1 and list(euler[0].get_xdata()) == [2, 4, 100]
    fig.canvas.draw()
    labels = {t.get_text() for t in ax.get_xticklabels() if t.get_text()}
    assert {"1", "2", "5", "10", "100"} <= labels, labels  # plain numbers, not 10^x only
    plt.close(fig)
