"""`FiniteGuard`: a run stops on its first non-finite loss or gradient, no checkpoint or export holds non-finite or
unbounded weights, and the error names the newest checkpoint (the last good one) to resume from."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tmd_lightning.callbacks import ExportPretrained, FinalStateCheckpoint, FiniteGuard
from tmd_lightning.runtime.finite import all_finite


class _Diverging(L.LightningModule):
    """A linear model that trains normally until `bad_step`, where it goes wrong in one of three ways."""

    def __init__(self, bad_step: int, how: str) -> None:
        super().__init__()
        self.network = torch.nn.Linear(2, 1)
        self.bad_step, self.how = bad_step, how
        self.exported = False

    def training_step(self, batch, batch_idx):
        loss = self.network(batch[0]).pow(2).mean()
        if self.global_step >= self.bad_step and self.how == "loss":
            loss = loss * float("nan")
        if self.global_step >= self.bad_step and self.how == "gradient":  # finite loss, infinite gradient
            loss = loss + torch.sqrt(self.network.bias.abs() * 0.0).sum()  # d sqrt(u)/du at u = 0 is inf
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        # "weights": an enormous learning rate from bad_step on blows the weights up while every loss stays finite
        big = (lambda step: 1e30 if step >= self.bad_step else 1.0) if self.how == "weights" else (lambda step: 1.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, big), "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(256, 2)), batch_size=4)

    def export_pretrained(self, path: str) -> bool:
        self.exported = True
        return True


def _fit(tmp_path: Path, module: L.LightningModule, max_steps: int = 10) -> None:
    callbacks = [FinalStateCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:03d}", every_n_train_steps=1,
                                      save_last=True, save_top_k=-1, auto_insert_metric_name=False),
                 FiniteGuard(max_abs_weight=1e4), ExportPretrained(str(tmp_path / "export"))]
    L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module)


def _saved_weights_finite(folder: Path) -> list[bool]:
    return [all_finite(torch.load(p, weights_only=True)["state_dict"].values(), 1e4) for p in folder.glob("*.ckpt")]


@pytest.mark.parametrize(("how", "what"), [("loss", "non-finite loss at step 4"),
                                           ("gradient", "non-finite gradient at step 4"),
                                           ("weights", "unbounded")])
def test_a_diverging_run_stops_keeps_finite_checkpoints_names_the_last_good_one_and_exports_nothing(
        tmp_path: Path, how: str, what: str) -> None:
    module = _Diverging(bad_step=4, how=how)
    with pytest.raises(FloatingPointError, match=what) as info:
        _fit(tmp_path, module)
    saved = _saved_weights_finite(tmp_path / "ckpt")
    assert saved and all(saved)  # the checkpoints before the failure, and nothing after it
    # the newest checkpoint on disk is the one the error names
    newest = max((tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert f"ckpt_path={newest}" in str(info.value)
    step = torch.load(newest, weights_only=True)["global_step"]
    assert step == 4  # the state before the step that failed (or, for "weights", the step that blew them up)
    assert not module.exported and not (tmp_path / "export").exists()


def test_a_finite_run_is_untouched(tmp_path: Path) -> None:
    module = _Diverging(bad_step=10**9, how="loss")
    _fit(tmp_path, module, max_steps=6)
    assert module.exported and all(_saved_weights_finite(tmp_path / "ckpt"))


def test_all_finite_checks_values_and_bound() -> None:
    assert all_finite([torch.ones(3), torch.zeros(2)], max_abs=1.0)
    assert not all_finite([torch.ones(3) * 2], max_abs=1.0)
    assert not all_finite([torch.tensor([0.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")])])
    assert all_finite([torch.tensor([1, 2**40])], max_abs=1.0)  # integer buffers (counters) are not weights
