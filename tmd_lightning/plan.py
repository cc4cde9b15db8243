"""Entry point: `python -m tmd_lightning.plan` — what every stage costs per GPU, before any weight is downloaded.

Config -> plan -> print: builds every network of the run on the meta device, counts it and prints, per GPU, the
memory of Stage 1 (`adapt_head`), Stage 2 (`distill`) and the DMD2-v baseline (`distill_dmd2`), in full and LoRA
mode, with a verdict per GPU size; the same Markdown goes to `plan.md` in the run folder. `experiment=wan_*` plans
the run an experiment composes. The memory model is `tmd_lightning.planning`; docs/plan.md gives every formula.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.planning import plan, report

register_resolvers()

# keys of configs/plan.yaml that the fit config does not have: given with experiment=..., they go to the plan
PLAN_ONLY = ("strategy", "gpu_memory_gib", "micro_batch", "video", "frozen_dtype", "discriminator_hidden_dim",
             "use_gan", "encoders_on_gpu", "autocast_weight_cache", "fsdp_param_dtype", "fd_full_precision",
             "verdict_gpus", "output_dir", "lora", "hydra", "paths")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prints the plan and writes it to `<output_dir>/plan.md`; returns what `plan` returns plus the Markdown."""
    result = plan(cfg)
    text = report(cfg, result)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.md").write_text(text + "\n")
    print(text + f"\n\nwritten to {out / 'plan.md'}")
    return result | {"markdown": text}


def experiment_config(overrides: list[str]) -> DictConfig:
    """The plan config of `python -m tmd_lightning.plan experiment=wan_* [overrides]`: the fit config the experiment
    composes (with the overrides the fit config knows: model, trainer, stage, data, ...) turned into plan keys the way
    the setup guard does (`guards.plan_config`: its stage, micro batch, clip size, cache, LoRA flags, the strategy's
    param_dtype), its activation checkpointing and stage as the verdict's, then the plan-only overrides."""
    from hydra import compose, initialize_config_dir

    from tmd_lightning.guards import PLAN_STAGES, plan_config

    own = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in PLAN_ONLY]
    fit = [o for o in overrides if o not in own]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        fit_cfg = compose("fit", overrides=fit)
        base = compose("plan", overrides=[o for o in overrides if o.split("=")[0] in ("model", "trainer")] + own)
    stage = PLAN_STAGES.get(str(fit_cfg.stage.get("_target_", "")))
    if stage is None:
        raise ValueError(f"experiment {fit_cfg.get('task_name')}: stage {fit_cfg.stage.get('_target_')} is not one the "
                         f"plan models ({', '.join(PLAN_STAGES.values())})")
    derived = plan_config(fit_cfg)
    asked = {o.lstrip("+").split("=")[0] for o in own}
    for key, value in derived.items():
        if key not in asked and not any(a.startswith(f"{key}.") for a in asked):
            OmegaConf.update(base, key, value, merge=False, force_add=True)
    given = [o.split("=", 1)[1] for o in own if o.split("=")[0] in ("output_dir", "paths.output_dir")]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = Path(os.environ.get("TMD_ROOT", Path.cwd()))
    OmegaConf.set_struct(base, False)
    base.output_dir = given[-1] if given else str(root / "logs" / "plan" / "runs" / stamp)
    base.experiment = str(fit_cfg.get("task_name"))
    base.plan_stage = stage
    base.activation_checkpointing = bool(fit_cfg.stage.get("activation_checkpointing", False))
    return base


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="plan")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """`python -m tmd_lightning.plan [overrides]`; with `experiment=wan_*`, the plan of that experiment's run."""
    overrides = sys.argv[1:]
    if any(o.lstrip("+").startswith("experiment=") for o in overrides):
        run(experiment_config([o.lstrip("+") if o.lstrip("+").startswith("experiment=") else o for o in overrides]))
        return
    _hydra_main()


if __name__ == "__main__":
    main()
