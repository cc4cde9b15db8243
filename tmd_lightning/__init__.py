"""tmd_lightning: Transition Matching Distillation for video flow models, on Lightning + Hydra."""

__version__ = "0.1.0"
