"""What the entry points keep off the console: third-party notices that are not about the run.

Filtered, each for a reason: Lightning's advertising tip, and its note that our `ParameterSummary` replaces its
own; its warning that frozen networks (teacher, codec, text encoder) are in eval mode, which they are by design;
its note that a stage without `validation_step` skips the validation loader the DataModule offers; its advice to
save a pre-optimizer-step state under manual optimisation (ours checkpoints between iterations); a deprecation
inside Lightning's own pytree helper; the loading bars of transformers and diffusers (one model folder is not
progress worth a bar). Everything else still shows.
"""

from __future__ import annotations

import logging
import warnings

_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"Found \d+ module\(s\) in eval mode at the start of (training|evaluation)",
    r"You passed in a `val_dataloader` but have no `validation_step`",
    # advice for a pattern of Lightning's own tests: a manual-optimisation stage here checkpoints between iterations,
    # so the state after the optimizer step is the resumable one
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state",
)
_LOG_MESSAGES = ("💡 Tip:", "Trainer already configured with model summary callbacks")
_done = False


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_LOG_MESSAGES)


def quiet_third_party() -> None:
    """Installs the filters: the warning filters on every call (`warnings.catch_warnings` blocks, pytest's among
    them, restore the filter list on exit; `filterwarnings` replaces an identical entry, so calls do not pile up),
    the logging filters and progress-bar switches once per process."""
    global _done
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if _done:
        return
    _done = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages())
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a dependency
        pass
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
