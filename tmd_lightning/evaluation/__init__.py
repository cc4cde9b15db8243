"""Evaluation, in one home: sampling fixed prompts x seeds through a stage (`generate`), scoring the videos
(`scores`: toy accuracy and toy-FD, FVD against a kept real reference, CLIP score, collapse diagnostics) and writing
the results (`report`: quality-vs-cost table, CSV, Pareto plot, sample folders).

`sample`, `evaluate`, `generate`, `precompute`, `kd_pairs`, the sampling callbacks and the toy study all use these;
the entry points only turn a config into their arguments.
"""

from tmd_lightning.evaluation.generate import (
    allow_tf32,
    generate_videos,
    load_model,
    load_stage,
    prepare_stage,
    resolve_device,
    resolve_prompts,
)
from tmd_lightning.evaluation.report import (
    COLUMNS,
    markdown_table,
    pareto_figure,
    pareto_front,
    pareto_plot,
    result_row,
    results_table,
    write_csv,
    write_results,
    write_row_samples,
    write_vbench,
)
from tmd_lightning.evaluation.scores import (
    Scorer,
    ToyReference,
    diagnostics,
    reference_fvd,
    score_clip,
    score_fvd,
    toy_accuracy,
    toy_fd,
    toy_report,
    toy_stats,
    video_scores,
)

__all__ = [
    "COLUMNS",
    "Scorer",
    "ToyReference",
    "allow_tf32",
    "diagnostics",
    "generate_videos",
    "load_model",
    "load_stage",
    "markdown_table",
    "pareto_figure",
    "pareto_front",
    "pareto_plot",
    "prepare_stage",
    "reference_fvd",
    "resolve_device",
    "resolve_prompts",
    "result_row",
    "results_table",
    "score_clip",
    "score_fvd",
    "toy_accuracy",
    "toy_fd",
    "toy_report",
    "toy_stats",
    "video_scores",
    "write_csv",
    "write_results",
    "write_row_samples",
    "write_vbench",
]
