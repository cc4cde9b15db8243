"""Stage 2 (distill, docs/method.md §5) and the DMD2-v baseline on tiny random Wan models, the pixel codec and the
toy T5."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import WanTransformer3DModel
from distill_data import _loader, _videos  # noqa: I001

from tmd_lightning.checkpoints import load_checkpoint_stage
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.models import TOY_MODEL_DIR, Discriminator, PixelCodec, TextEncoder, TMDTransformer
from tmd_lightning.models.wan_parts import block_features, embed, output_head, run_blocks
from tmd_lightning.stages import DMD2Stage, TMDDistillStage

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=3)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def _teacher(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    teacher = WanTransformer3DModel(**TINY)
    with torch.no_grad():
        teacher.proj_out.weight.normal_(std=0.1)
    return teacher


def _stage(text_encoder, kind: str = "tmd", seed: int = 0, **kw):
    teacher = _teacher(seed)
    kw.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3))
    kw.setdefault("discriminator", partial(Discriminator, feature_blocks=(0, 1), hidden_dim=8))
    if kind == "tmd":
        student = TMDTransformer.from_teacher(teacher, head_blocks=1)
        return TMDDistillStage(student, teacher, PixelCodec(4), text_encoder, N=2, **kw)
    return DMD2Stage(_teacher(seed), teacher, PixelCodec(4), text_encoder, **kw)


def _trainer(root: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(root), **kw)


# ------------------------------------------------------------------------------------------------ Wan in pieces
@torch.no_grad()
def test_wan_parts_reassemble_diffusers_forward():
    teacher = _teacher().eval()
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 48, 3, 4, 4, generator=g), torch.tensor([0.2, 0.7]), torch.randn(2, 5, 64, generator=g)
    inputs = embed(teacher, x, t, text)
    hidden = run_blocks(teacher, teacher.blocks, inputs.hidden_states, inputs.text, inputs.modulation,
                        inputs.rotary_emb)
    ref = teacher(x, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(output_head(teacher, hidden, inputs.temb, inputs.grid), ref)
    feats = block_features(teacher, x, t, text, [2])
    assert feats[0].shape == (2, 32, 3, 4, 4)
    torch.testing.assert_close(feats[0].permute(0, 2, 3, 4, 1).flatten(1, 3), hidden)


def test_block_features_stop_at_the_last_block_needed():
    teacher = _teacher()
    calls = []
    for i, block in enumerate(teacher.blocks):
        block.register_forward_hook(lambda *a, i=i: calls.append(i))
    block_features(teacher, torch.randn(1, 48, 2, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 64), [1, 0])
    assert calls == [0, 1]
    with pytest.raises(ValueError, match="feature blocks"):
        block_features(teacher, torch.randn(1, 48, 2, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 64), [3])


# ------------------------------------------------------------------------------------------------ the losses
def test_vsd_is_zero_when_fake_score_is_the_teacher_and_cfg_is_one(text_encoder):
    """DMD's sanity check: with fake = teacher and no guidance, g_fake = g_real and the student gets no gradient."""
    stage = _stage(text_encoder, cfg_scale=1.0, use_gan=False, discriminator=None)
    opt = torch.optim.SGD(stage.student.parameters(), lr=1.0)
    stage.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    stage.log = lambda *a, **k: None  # type: ignore[method-assign]
    stage.manual_backward = lambda t, *a, **k: t.backward(*a, **k)  # type: ignore[method-assign]
    before = {k: v.clone() for k, v in stage.student.state_dict().items()}
    x, text = stage.encode_batch(_videos(2))
    stats = stage.student_iteration(x, text, stage.negative_embedding(2), opt)
    assert stats["loss_vsd"] == 0 and stats["grad_norm_x_hat_vsd"] == 0
    grads = [p.grad for p in stage.student.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() == 0 for g in grads)
    assert all(torch.equal(v, before[k]) for k, v in stage.student.state_dict().items())
    # with guidance the teacher's target moves away from the fake score's: a real gradient
    stage.hparams.cfg_scale = 5.0
    stats = stage.student_iteration(x, text, stage.negative_embedding(2), opt)
    assert stats["grad_norm_x_hat_vsd"] > 0


def test_vsd_gradient_and_loss_match_their_formulas():
    from tmd_lightning.losses import gan_discriminator_loss, gan_generator_loss, vsd_gradient

    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, 2, 1, 2, 2, generator=g, requires_grad=True)
    g_fake, g_real = torch.randn(3, 2, 1, 2, 2, generator=g), torch.randn(3, 2, 1, 2, 2, generator=g)
    grad = vsd_gradient(x_hat.detach(), g_fake, g_real)
    weight = (x_hat.detach() - g_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grad, (g_fake - g_real) / weight)
    with pytest.raises(FloatingPointError):
        vsd_gradient(x_hat.detach(), g_fake * float("nan"), g_real)
    fake, real = [torch.tensor([0.0, 2.0])], [torch.tensor([1.0, -1.0])]
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(gan_generator_loss(fake), sp(-fake[0]).mean())
    torch.testing.assert_close(gan_discriminator_loss(fake, real), sp(fake[0]).mean() + sp(-real[0]).mean())


def test_vsd_loss_x_hat_gradient_is_the_dmd_direction_over_numel_as_in_dmd2():
    """DMD2 / FastGen: `0.5 * mse(x̂, sg(x̂ - grad))`, so dL/dx̂ = grad / numel ("mean") or grad / batch ("sum").

    Expected values written out by hand for 2 samples x 2 elements (numel 4, batch 2)."""
    from tmd_lightning.losses import vsd_loss

    x_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 2, 1, 1, 1).requires_grad_(True)
    grad = torch.tensor([[0.5, -1.0], [2.0, 0.0]]).view(2, 2, 1, 1, 1)
    loss = vsd_loss(x_hat, grad, "mean")
    assert float(loss) == pytest.approx(0.5 * (0.25 + 1.0 + 4.0 + 0.0) / 4)
    (d_mean,) = torch.autograd.grad(loss, x_hat)
    assert d_mean.flatten().tolist() == pytest.approx([0.125, -0.25, 0.5, 0.0])
    (d_sum,) = torch.autograd.grad(vsd_loss(x_hat, grad, "sum"), x_hat)
    assert d_sum.flatten().tolist() == pytest.approx([0.25, -0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="reduction"):
        vsd_loss(x_hat, grad, "none")


def test_dmd2_sampler_is_euler_on_the_same_grid():
    from tmd_lightning.flow import time_grid
    from tmd_lightning.sampling import dmd2_sample, euler_sample

    a = torch.randn(2, 3)

    def velocity(x, t):
        return torch.sin(3 * x) * a + t.view(-1, 1)

    noise, grid = torch.randn(2, 3), time_grid(4, 5.0, 0.999)
    torch.testing.assert_close(dmd2_sample(velocity, noise, grid), euler_sample(velocity, noise, grid))


# ------------------------------------------------------------------------------------------------ the iterations
def _counting(stage) -> dict[str, list[int]]:
    calls: dict[str, list[int]] = {"teacher": [], "fake_score": []}
    for name in calls:
        getattr(stage, name).register_forward_hook(lambda m, args, kwargs, out, name=name: calls[name].append(
            args[0].shape[0]), with_kwargs=True)
    return calls


def test_student_iteration_batches_the_cfg_pair_and_updates_only_the_student(text_encoder, tmp_path):
    stage = _stage(text_encoder, max_iterations=1)
    trainer = _trainer(tmp_path)
    calls = _counting(stage)
    before = {n: {k: v.clone() for k, v in getattr(stage, n).state_dict().items()}
              for n in ("student", "teacher", "fake_score", "discriminator")}
    trainer.fit(stage, train_dataloaders=_loader(4))
    assert calls["teacher"] == [4]  # one batched forward for the CFG pair of 2 samples (features: blocks only)
    assert calls["fake_score"] == [2]
    changed = {n: any(not torch.equal(v, before[n][k]) for k, v in getattr(stage, n).state_dict().items())
               for n in before}
    assert changed == {"student": True, "teacher": False, "fake_score": False, "discriminator": False}


def test_critic_iterations_update_only_the_critics(text_encoder, tmp_path):
    stage = _stage(text_encoder)
    stage.iteration = 1  # a critic iteration
    before = {n: {k: v.clone() for k, v in getattr(stage, n).state_dict().items()}
              for n in ("student", "teacher", "fake_score", "discriminator")}
    stage.hparams.max_iterations = 2
    _trainer(tmp_path).fit(stage, train_dataloaders=_loader(4))
    changed = {n: any(not torch.equal(v, before[n][k]) for k, v in getattr(stage, n).state_dict().items())
               for n in before}
    assert changed == {"student": False, "teacher": False, "fake_score": True, "discriminator": True}
    assert all(not p.requires_grad for p in stage.teacher.parameters())


def test_ttur_phase_and_checkpoint_without_teacher(text_encoder, tmp_path):
    stage = _stage(text_encoder, max_iterations=6)
    phases = []
    original = stage.student_iteration

    def record(*a, **k):
        phases.append(stage.iteration)
        return original(*a, **k)

    stage.student_iteration = record  # type: ignore[method-assign]
    trainer = _trainer(tmp_path)
    trainer.fit(stage, train_dataloaders=_loader(12))
    assert phases == [0, 5] and stage.iteration == 6
    assert trainer.global_step == 6  # one Lightning step per iteration, so periods in steps are iterations
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith(("teacher.", "text_encoder.", "codec.")) for k in keys)
    assert any(k.startswith("fake_score.") for k in keys) and any(k.startswith("discriminator.") for k in keys)
    assert len(ckpt["optimizer_states"]) == 3 and ckpt["distill"]["iteration"] == 6


@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_exact_resume_matches_an_uninterrupted_run(text_encoder, tmp_path, kind):
    """10 iterations straight vs 5 + resume + 5: identical weights (optimizer states, TTUR phase, RNG restored)."""

    def fresh(max_iterations: int):
        L.seed_everything(0, verbose=False)
        return _stage(text_encoder, kind, max_iterations=max_iterations)

    straight = fresh(10)
    L.seed_everything(1, verbose=False)
    _trainer(tmp_path / "a").fit(straight, train_dataloaders=_loader(10))

    first = fresh(5)
    L.seed_everything(1, verbose=False)
    trainer = _trainer(tmp_path / "b")
    trainer.fit(first, train_dataloaders=_loader(10))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = fresh(10)
    L.seed_everything(123, verbose=False)  # a different seed: the checkpoint's RNG state must win
    _trainer(tmp_path / "c").fit(resumed, train_dataloaders=_loader(10), ckpt_path=tmp_path / "half.ckpt",
                                       weights_only=False)
    assert resumed.iteration == straight.iteration == 10
    for name in ("student", "fake_score", "discriminator"):
        for (k, a), (_, b) in zip(getattr(straight, name).state_dict().items(),
                                  getattr(resumed, name).state_dict().items(), strict=True):
            assert torch.equal(a, b), f"{name}.{k}"


def test_non_finite_loss_stops_with_its_name_and_writes_nothing(text_encoder, tmp_path):
    """The run stops at once and saves nothing: the state of the iteration that failed may already be diverging
    (the last good checkpoint, which callbacks/finite.py names, is tested in tests/callbacks/test_finite.py)."""
    stage = _stage(text_encoder, max_iterations=3)
    with torch.no_grad():
        stage.fake_score.proj_out.bias.fill_(float("nan"))
    trainer = _trainer(tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite g_fake at iteration 0; no checkpoint was written"):
        trainer.fit(stage, train_dataloaders=_loader(4))
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_distill_checkpoint_samples_as_its_student(text_encoder, tmp_path, kind):
    stage = _stage(text_encoder, kind, max_iterations=2)
    trainer = _trainer(tmp_path)
    trainer.fit(stage, train_dataloaders=_loader(4))
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    sampler = load_checkpoint_stage(tmp_path / "d.ckpt", PixelCodec(4), text_encoder).eval()
    caps = all_captions()[:2]
    expected = stage.eval().generate(caps, [0, 1], 9, 16, 16)
    assert torch.equal(sampler.generate(caps, [0, 1], 9, 16, 16), expected)
    assert sampler.sampler_nfe() == stage.sampler_nfe() == (2 * (1 + 1 / 3) if kind == "tmd" else 2)


def test_ablation_switches(text_encoder):
    with pytest.raises(ValueError, match="x_hat"):
        _stage(text_encoder, x_hat="other")
    stage = _stage(text_encoder, x_hat="x_minus_ty", rollout=False)
    x, text = stage.encode_batch(_videos(2))
    x_hat = stage.sample_from_data(x, text)
    assert x_hat.shape == x.shape and x_hat.requires_grad
    no_gan = _stage(text_encoder, use_gan=False, discriminator=None)
    assert no_gan.discriminator is None and len(no_gan.configure_optimizers()) == 2


@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_bf16_teacher_as_on_gpu(text_encoder, tmp_path, kind):
    """The teacher cast as `setup` casts it on a GPU (bf16, diffusers' float32-kept modules float32) takes the stage's
    float32 tensors: its CFG target is the float32 teacher's up to bf16 rounding, and a student and a critic
    iteration (VSD, GAN features through the bf16 blocks) run with finite values."""
    from tmd_lightning.models.lora import cast_keeping_adapters

    stage = _stage(text_encoder, kind, max_iterations=2)
    reference = _teacher().eval()
    cast_keeping_adapters(stage.teacher, torch.bfloat16)
    assert stage.teacher.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x_t, text, neg = torch.randn(2, 48, 3, 4, 4, generator=g), torch.randn(2, 8, 64, generator=g), \
        torch.randn(2, 8, 64, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        g_real = stage.teacher_x0(x_t, t, text, neg)
        stage.teacher, bf16_teacher = reference, stage.teacher
        expected = stage.teacher_x0(x_t, t, text, neg)
        stage.teacher = bf16_teacher
    assert g_real.dtype == torch.float32
    assert float((g_real - expected).norm() / expected.norm()) < 0.03  # measured 0.010 (CFG 5 scales bf16 error)
    stage.log = lambda *a, **k: None  # type: ignore[method-assign]
    seen: list[float] = []
    stage.log_dict = lambda d, **k: seen.extend(float(v) for v in d.values())  # type: ignore[method-assign]
    _trainer(tmp_path).fit(stage, train_dataloaders=_loader(4))
    assert stage.iteration == 2 and seen and all(torch.isfinite(torch.tensor(seen)))


@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_a_batch_without_samples_is_skipped(text_encoder, kind):
    """Every item of the batch was an unusable file: no iteration runs, and the student/critic schedule waits."""
    stage = _stage(text_encoder, kind)
    stage.ema_update_due = True
    assert stage.training_step({"video": torch.empty(0, dtype=torch.uint8), "caption": []}, 0) is None
    assert stage.iteration == 0 and not stage.ema_update_due


def test_foreground_weight_weights_the_fake_score_loss_on_the_student_samples(text_encoder, monkeypatch, tmp_path):
    """stage.foreground_weight: the fake score's flow-matching loss counts `1 + w` on the shape of each decoded
    student sample and its ring (the teacher's mask); 0 keeps the plain loss; the pixel codec is required."""
    import tmd_lightning.stages.distill as distill
    from tmd_lightning.stages.foreground import foreground_mask

    stage = _stage(text_encoder, foreground_weight=4.0)
    video = torch.full((2, 9, 16, 16, 3), 40, dtype=torch.uint8)
    video[:, :, 4:9, 5:10] = 220
    weight = stage.sample_weights(stage.codec.encode(video))
    mask = stage.codec.encode(foreground_mask(video).to(torch.uint8).mul(255).expand_as(video)) > 0
    assert torch.equal(weight, 1 + 4.0 * mask.float()) and mask.any() and not mask.all()
    seen = []
    original = distill.flow_matching_loss
    monkeypatch.setattr(distill, "flow_matching_loss", lambda *a: seen.append(a[3:]) or original(*a))
    for stage_ in (stage, _stage(text_encoder)):
        stage_.iteration, stage_.hparams.max_iterations = 1, 2  # one critic iteration
        _trainer(tmp_path).fit(stage_, train_dataloaders=_loader(2))
    (weighted,), (plain,) = seen
    assert weighted.shape == (2, 48, 9, 4, 4) and set(weighted.unique().tolist()) <= {1.0, 5.0}
    assert plain is None
    with pytest.raises(ValueError, match="pixel codec"):
        TMDDistillStage(TMDTransformer.from_teacher(_teacher(), head_blocks=1), _teacher(), object(), text_encoder,
                        optimizer=None, discriminator=None, use_gan=False, foreground_weight=1.0)
