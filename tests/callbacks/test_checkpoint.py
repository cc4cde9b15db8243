"""`FinalStateCheckpoint`: `last.ckpt` holds the final step, where Lightning's own callback keeps the last period."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tmd_lightning.callbacks import FinalStateCheckpoint


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)


def _last_step(callback_cls, tmp_path, max_steps: int) -> int:
    callback = callback_cls(dirpath=tmp_path, every_n_train_steps=5, save_last=True, save_top_k=1)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Tiny())
    return torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"]


@pytest.mark.parametrize("max_steps", [7, 10])
def test_last_checkpoint_is_the_final_step(tmp_path, max_steps):
    assert _last_step(FinalStateCheckpoint, tmp_path / "ours", max_steps) == max_steps


def test_lightning_alone_keeps_the_last_period(tmp_path):
    """The behaviour the subclass exists for: without it `last.ckpt` lags when max_steps is not a multiple."""
    assert _last_step(ModelCheckpoint, tmp_path, 7) == 5


def test_fast_dev_run_writes_no_checkpoint(tmp_path):
    callback = FinalStateCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.Trainer(fast_dev_run=True, callbacks=[callback], logger=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(_Tiny())
    assert not (tmp_path / "ckpt").exists()


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("boom")


@pytest.mark.parametrize("crash_at_step", [None, 3])
def test_latest_moves_only_once_a_checkpoint_is_written(tmp_path, crash_at_step):
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    old.mkdir(parents=True)
    link = tmp_path / "latest"
    link.symlink_to("runs/old")
    callback = FinalStateCheckpoint(dirpath=new / "checkpoints", every_n_train_steps=5, save_last=True)
    callback.link_latest_on_save(link, new)
    trainer = L.Trainer(max_steps=7, callbacks=[callback] + ([_Crash()] if crash_at_step else []), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    if crash_at_step:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(_Tiny())
        assert link.resolve() == old.resolve()  # crashed before its first checkpoint
    else:
        trainer.fit(_Tiny())
        assert link.resolve() == new.resolve() and (link / "checkpoints" / "last.ckpt").is_file()
        assert not link.readlink().is_absolute()  # relative: the logs folder can move
