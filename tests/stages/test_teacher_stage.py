"""The flow-matching teacher stage (docs/method.md §2, §6) on a tiny Wan transformer, the pixel codec and the
toy T5."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.callbacks import SkippedSamplesLogger
from tmd_lightning.data import VideoTextDataModule, write_manifest
from tmd_lightning.data.toy_world import all_captions, parse_caption, random_spec, render, write_mp4
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder
from tmd_lightning.stages import TeacherStage

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def _stage(text_encoder, seed: int = 0, **kw) -> TeacherStage:
    torch.manual_seed(seed)
    kw.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3))
    return TeacherStage(WanTransformer3DModel(**TINY), PixelCodec(4), text_encoder, **kw)


@pytest.fixture(scope="module")
def stage(text_encoder) -> TeacherStage:
    return _stage(text_encoder).eval()


def _batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    caps = all_captions()
    return {"video": torch.randint(0, 256, (b, 9, 16, 16, 3), generator=g, dtype=torch.uint8),
            "caption": [caps[(7 * i + seed) % len(caps)] for i in range(b)]}


def test_velocity_is_the_diffusers_model_at_timestep_1000t(stage, text_encoder):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 9, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.85])
    text = text_encoder(all_captions()[:2])
    with torch.no_grad():
        v = stage.velocity(x, t, text)
        ref = stage.transformer(hidden_states=x, timestep=torch.tensor([300.0, 850.0]),
                                encoder_hidden_states=text).sample
        other = stage.transformer(hidden_states=x, timestep=torch.tensor([0.3, 0.85]),
                                  encoder_hidden_states=text).sample
    assert v.shape == x.shape
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v, other, atol=1e-4)  # the time scale matters for this model


def test_training_step_loss_and_gradient_flow(text_encoder):
    stage = _stage(text_encoder).train()
    assert not stage.text_encoder.training and not stage.codec.training  # frozen encoders stay in eval mode
    torch.manual_seed(1)
    loss = stage.training_step(_batch(), 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert 0.1 < loss.item() < 10  # about E|eps - x|^2 ~ 1 + E x^2 at init
    loss.backward()
    tr = dict(stage.transformer.named_parameters())
    for name in ["patch_embedding.weight", "proj_out.weight", "blocks.0.attn2.to_k.weight",
                 "condition_embedder.text_embedder.linear_1.weight",
                 "condition_embedder.time_embedder.linear_1.weight"]:
        assert tr[name].grad is not None and tr[name].grad.abs().sum() > 0, name
    with_grad = [n for n, p in tr.items() if p.grad is not None]
    assert len(with_grad) == len(tr)
    assert all(p.grad is None for p in stage.text_encoder.parameters())
    assert all(p.grad is None for p in stage.codec.parameters())


def test_training_step_uses_negative_prompt_for_dropped_captions(text_encoder):
    """cond_dropout = 1 replaces every caption by the empty prompt: the loss equals the all-negative batch's."""
    stage = _stage(text_encoder, cond_dropout=1.0).train()
    batch = _batch(2)
    torch.manual_seed(3)
    dropped = stage.training_step(batch, 0)
    torch.manual_seed(3)
    neg = {"video": batch["video"], "caption": ["", ""]}
    assert torch.allclose(dropped, stage.training_step(neg, 0), atol=1e-6)
    stage0 = _stage(text_encoder, cond_dropout=0.0).train()
    torch.manual_seed(3)
    assert not torch.allclose(stage0.training_step(batch, 0), dropped, atol=1e-6)


def test_configure_optimizers_covers_only_the_transformer(text_encoder):
    stage = _stage(text_encoder)
    opt = stage.configure_optimizers()["optimizer"]
    params = [p for group in opt.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in stage.transformer.parameters()}


def test_checkpoint_strips_frozen_encoders_and_reloads(stage, text_encoder):
    state = stage.state_dict()
    assert any(k.startswith("text_encoder.") for k in state)  # there is something to strip
    checkpoint = {"state_dict": dict(state)}
    stage.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert not any(k.startswith(("codec.", "text_encoder.")) for k in kept)
    assert set(kept) == {k for k in state if k.startswith("transformer.")}
    other = _stage(text_encoder, seed=5)
    assert not torch.equal(other.transformer.proj_out.weight, stage.transformer.proj_out.weight)
    other.load_state_dict(kept, strict=other.strict_loading)
    for k, v in stage.transformer.state_dict().items():
        assert torch.equal(other.transformer.state_dict()[k], v), k


def test_generate_shape_reproducibility_and_batch_independence(stage):
    caps = all_captions()
    videos = stage.generate([caps[0], caps[5]], [3, 4], 9, 16, 16, steps=2, cfg=3.0)
    assert videos.dtype == torch.uint8 and videos.shape == (2, 9, 16, 16, 3)
    again = stage.generate([caps[0], caps[5]], [3, 4], 9, 16, 16, steps=2, cfg=3.0)
    assert torch.equal(videos, again)
    assert not torch.equal(videos[0], videos[1])
    alone = stage.generate([caps[5]], [4], 9, 16, 16, steps=2, cfg=3.0)
    assert (alone[0].int() - videos[1].int()).abs().max() <= 1
    other_seed = stage.generate([caps[5]], [5], 9, 16, 16, steps=2, cfg=3.0)
    assert (other_seed[0].int() - videos[1].int()).abs().max() > 1


def test_generate_matches_hand_written_cfg_euler(stage, text_encoder):
    """Independent reference: noise from the seed, two Euler steps on t = 1 -> shift(1/2, 3) = 0.75 -> 0 with
    separate conditional / negative calls, decoded with the pixel codec."""
    cap, seed, w = all_captions()[9], 11, 3.0
    video = stage.generate([cap], [seed], 9, 16, 16, steps=2, cfg=w, gamma=3.0, solver="euler")
    x = torch.randn((48, 9, 4, 4), generator=torch.Generator().manual_seed(seed))[None]
    cond, neg = text_encoder([cap]), text_encoder([""])
    with torch.no_grad():
        for t, t_next in [(1.0, 0.75), (0.75, 0.0)]:
            ts = torch.tensor([1000.0 * t])
            v_c = stage.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=cond).sample
            v_n = stage.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=neg).sample
            x = x - (t - t_next) * (v_n + w * (v_c - v_n))
    ref = PixelCodec(4).decode(x)
    assert (video.int() - ref.int()).abs().max() <= 1


def test_sampler_nfe(stage):
    assert stage.sampler_nfe(steps=2, cfg=3.0) == 4
    assert stage.sampler_nfe(steps=7, cfg=1.0) == 7
    assert stage.sampler_nfe() == 100  # defaults: 50 steps with CFG 5


def test_short_overfit_lowers_the_loss(text_encoder):
    """30 AdamW steps on one fixed batch of rendered toy videos, with t / noise fixed by a seed, halve the loss."""
    rng = np.random.default_rng(0)
    caps = all_captions()[::13][:4]
    batch = {"video": torch.from_numpy(np.stack([render(random_spec(rng, **parse_caption(c))) for c in caps])),
             "caption": caps}
    stage = _stage(text_encoder, seed=0, cond_dropout=0.0, optimizer=partial(torch.optim.AdamW, lr=3e-3)).train()
    opt = stage.configure_optimizers()["optimizer"]

    def loss_at_fixed_seed():
        torch.manual_seed(123)  # same t and noise each time: one fixed regression target
        return stage.training_step(batch, 0)

    with torch.no_grad():
        first = loss_at_fixed_seed().item()
        assert loss_at_fixed_seed().item() == first  # the objective really is fixed
    for _ in range(30):
        opt.zero_grad()
        loss = loss_at_fixed_seed()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_at_fixed_seed().item()
    assert last < 0.7 * first, (first, last)


class _MetricsLogger(L.pytorch.loggers.Logger):
    """Keeps what is logged, for assertions."""

    name, version = "memory", 0
    metrics: dict[str, float]

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics = {**getattr(self, "metrics", {}), **metrics}

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def test_a_batch_of_only_unusable_files_skips_the_step(text_encoder, tmp_path):
    """`data=manifest` trains with batch_size 1, so one corrupt file is a batch with no samples: its training and
    validation steps are skipped and counted, and training goes on."""
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(all_captions()[:2]):
        write_mp4(tmp_path / f"good_{i}.mp4", render(random_spec(rng, **parse_caption(caption)), 9, 16))
        rows.append({"path": f"good_{i}.mp4", "caption": caption})
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    rows.append({"path": "corrupt.mp4", "caption": all_captions()[2]})
    manifest = str(write_manifest(tmp_path / "m.csv", rows))
    dm = VideoTextDataModule(train_manifest=manifest, val_manifest=manifest, batch_size=1, max_skip_fraction=0.5,
                             spatial_multiple=4)
    logger = _MetricsLogger()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[SkippedSamplesLogger()], default_root_dir=str(tmp_path))
    trainer.fit(_stage(text_encoder), datamodule=dm)
    assert trainer.state.finished and trainer.global_step == 3
    assert dm.skips.empty_batches == 2  # one training, one validation batch
    assert [r.path.rsplit("/", 1)[-1] for r in dm.skips.skipped] == ["corrupt.mp4", "corrupt.mp4"]
    assert logger.metrics["data/skipped_batches"] == 2
    assert "val/loss" in trainer.callback_metrics


def test_a_codec_of_another_latent_width_is_refused_in_one_line(text_encoder):
    """A network trained with one toy codec (K frames per latent frame) sampled through another fails at once."""
    stage = _stage(text_encoder)
    stage.codec = PixelCodec(4, frames_per_latent=2)  # 96-channel latents for a 48-channel network
    with pytest.raises(ValueError, match="makes 96-channel latents but the network takes in_channels=48"):
        stage.generate(["a red square moving left"], [0], 9, 16, 16, steps=1)


def test_foreground_mask_is_the_shape_grown_by_one_pixel():
    from scipy.ndimage import binary_dilation

    from tmd_lightning.data.toy_world import ToyVideoSpec
    from tmd_lightning.stages.foreground import foreground_mask

    specs = [ToyVideoSpec("red", "circle", "right", 0.35, 0.3, 0.3, 0.5),
             ToyVideoSpec("blue", "square", "up", 0.3, 0.25, 0.6, 0.6)]
    videos = torch.from_numpy(np.stack([render(s) for s in specs]))
    mask = foreground_mask(videos)
    assert mask.shape == (2, 9, 16, 16, 1) and mask.dtype == torch.bool
    background = np.array([16, 16, 16])
    for i in range(2):
        for f in range(9):  # independent reference: scipy's dilation of the pixels off the background colour
            shape = (np.abs(videos[i, f].numpy().astype(int) - background) > 8).any(-1)
            ring = binary_dilation(shape, structure=np.ones((3, 3), bool))
            assert np.array_equal(mask[i, f, ..., 0].numpy(), ring), (i, f)
            assert 0 < ring.sum() < 0.5 * ring.size


def test_foreground_weight_weights_the_loss_on_the_shape(text_encoder):
    from tmd_lightning.data.toy_world import ToyVideoSpec
    from tmd_lightning.stages.foreground import foreground_mask

    stage = _stage(text_encoder, foreground_weight=8.0)
    spec = ToyVideoSpec("green", "triangle", "left", 0.4, 0.3, 0.7, 0.5)
    batch = {"video": torch.from_numpy(render(spec))[None].expand(2, -1, -1, -1, -1).contiguous(),
             "caption": ["a green triangle moving left"] * 2}
    weight = stage.foreground_weights(batch)
    assert weight.shape == stage.codec.encode(batch["video"]).shape
    assert set(weight.unique().tolist()) == {1.0, 9.0}
    # the weights sit where the pixels of the grown mask are, in the codec's latent layout
    pixels = stage.codec.decode(weight - 5.0)  # 9 -> +4 (255 after clipping), 1 -> -4 (0)
    assert torch.equal(pixels[..., :1] > 127, foreground_mask(batch["video"]))
    with pytest.raises(ValueError, match="decoded videos"):
        stage.foreground_weights({"latents": torch.zeros(1, 48, 9, 4, 4), "caption": ["x"]})
    with pytest.raises(ValueError, match="pixel codec"):
        TeacherStage(WanTransformer3DModel(**TINY), object(), text_encoder, optimizer=None, foreground_weight=1.0)
