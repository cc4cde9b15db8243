"""Where the Hydra configs and packaged assets live, the OmegaConf resolvers the configs use, and how an entry point
composes its config (`hydra_entry`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.quiet import quiet_third_party

_PACKAGE = Path(__file__).resolve().parent
# Installed wheel: configs are packed into the package. Source checkout / editable install: top-level configs/.
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
ASSETS_DIR = _PACKAGE / "assets"


def one_step_or(M: int | str, one_step: object, otherwise: object) -> object:
    """`one_step` when the student takes one outer step (M = 1), else `otherwise`: the paper's per-M values (Stage 2
    runs 12k iterations for M = 1, 4k for M >= 2 at 1.3B)."""
    return one_step if int(M) == 1 else otherwise


def register_resolvers() -> None:
    """`${tmd_asset:NAME}` -> absolute path of a packaged asset folder (e.g. the shipped toy teacher);
    `${tmd_one_step:M,A,B}` -> A when M = 1, else B (`one_step_or`)."""
    if not OmegaConf.has_resolver("tmd_asset"):
        OmegaConf.register_new_resolver("tmd_asset", lambda name: str(ASSETS_DIR / name))
    if not OmegaConf.has_resolver("tmd_one_step"):
        OmegaConf.register_new_resolver("tmd_one_step", one_step_or)


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """Makes `main(cfg)` the command-line entry point of `configs/<config_name>.yaml`: Hydra composes the config from
    the command line's overrides, and third-party notices are quieted (`quiet.py`) before `main` runs.

    Hydra names the job (its `<job>.log` in the run folder) after the module of the function it finds by unwrapping,
    which is `main`'s own: `python -m tmd_lightning.fit` still writes `fit.log`. Registers the resolvers now, at the
    entry point's import, as its configs need them."""
    register_resolvers()

    def decorate(main: Callable[[DictConfig], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def quiet_main(cfg: DictConfig) -> None:
            quiet_third_party()
            main(cfg)

        return hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(quiet_main)

    return decorate
