"""The toy reproduction study behind `python -m tmd_lightning.reproduce`: runs, scores, report."""
