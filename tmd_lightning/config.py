"""Where the Hydra configs and packaged assets live, and the OmegaConf resolvers the configs use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

_PACKAGE = Path(__file__).resolve().parent
# Installed wheel: configs are packed into the package. Source checkout / editable install: top-level configs/.
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
ASSETS_DIR = _PACKAGE / "assets"


def register_resolvers() -> None:
    """`${tmd_asset:NAME}` -> absolute path of a packaged asset folder (e.g. the shipped toy teacher)."""
    if not OmegaConf.has_resolver("tmd_asset"):
        OmegaConf.register_new_resolver("tmd_asset", lambda name: str(ASSETS_DIR / name))
