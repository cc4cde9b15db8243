"""The student-only EMA against a hand-computed moving average, through a real Lightning loop."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tmd_lightning.callbacks import EMA


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 2).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean() + 0 * self.frozen(x).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.5)


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.history: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.history.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def _fit(steps: int, ema: EMA, recorder: _Recorder) -> _Tiny:
    torch.manual_seed(0)
    module = _Tiny()
    data = DataLoader(TensorDataset(torch.randn(64, 3)), batch_size=4)
    trainer = L.Trainer(max_steps=steps, callbacks=[recorder, ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, data)
    return module


def test_ema_matches_manual_average_and_swaps_back() -> None:
    ema, rec = EMA(decay=0.9, target="net"), _Recorder()
    module = _fit(6, ema, rec)
    expected = {n: v.clone() for n, v in rec.initial.items()}
    for step, params in enumerate(rec.history, start=1):
        decay = min(0.9, (1 + step) / (10 + step))
        for n in expected:
            expected[n] = decay * expected[n] + (1 - decay) * params[n]
    assert set(ema.shadow) == {"weight", "bias"}  # only the target's trainable parameters
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n])
    trained = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    assert not torch.allclose(trained["weight"], expected["weight"])
    with ema.swapped(module):
        torch.testing.assert_close(module.net.weight.detach(), expected["weight"])
    torch.testing.assert_close(module.net.weight.detach(), trained["weight"])


def test_ema_state_round_trip() -> None:
    ema, rec = EMA(decay=0.5, target="net"), _Recorder()
    _fit(2, ema, rec)
    restored = EMA(decay=0.5, target="net")
    restored.load_state_dict(ema.state_dict())
    for n, v in ema.shadow.items():
        torch.testing.assert_close(restored.shadow[n], v.cpu())
