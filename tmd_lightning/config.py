"""Where the Hydra configs and packaged assets live, and the OmegaConf resolvers the configs use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

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
