"""Stage 2 in LoRA mode (docs/method.md §9): the fake score as an adapter on the teacher, optionally a LoRA student."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import WanTransformer3DModel
from distill_data import _loader, _videos  # noqa: I001

from tmd_lightning.checkpoints import export_checkpoint, load_checkpoint_stage, load_pretrained_stage, load_student
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.models import TOY_MODEL_DIR, Discriminator, PixelCodec, TextEncoder, TMDTransformer
from tmd_lightning.models.lora import FAKE_SCORE, STUDENT, AdapterView, adapter_parameters
from tmd_lightning.models.wan_parts import block_features
from tmd_lightning.stages import DMD2Stage, TMDDistillStage

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=3)
LORA = dict(fake_score=True, student=False, rank=4, alpha=8)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def _teacher(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    teacher = WanTransformer3DModel(**TINY)
    with torch.no_grad():
        teacher.proj_out.weight.normal_(std=0.1)
    return teacher


def _stage(text_encoder, kind: str = "tmd", teacher: WanTransformer3DModel | None = None, **kw):
    teacher = _teacher() if teacher is None else teacher
    kw.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3))
    kw.setdefault("discriminator", partial(Discriminator, feature_blocks=(0, 1), hidden_dim=8))
    kw.setdefault("lora", LORA)
    if kind == "tmd":
        student = TMDTransformer.from_teacher(teacher, head_blocks=1)
        return TMDDistillStage(student, teacher, PixelCodec(4), text_encoder, N=2, **kw)
    return DMD2Stage(copy.deepcopy(teacher), teacher, PixelCodec(4), text_encoder, **kw)


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(root))


def _outside_a_trainer(stage):
    """The stage's own iteration methods without Lightning's loop (as `benchmarks/distill.py` runs them)."""
    stage.log = stage.log_dict = lambda *a, **k: None
    stage.manual_backward = lambda tensor, *a, **k: tensor.backward(*a, **k)
    return stage


def _snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def _fixed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 48, 3, 4, 4, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 64, generator=g)


# ------------------------------------------------------------------------------------------------ the fake score
@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_vsd_is_zero_with_a_lora_fake_score_at_init_and_cfg_one(text_encoder, kind):
    """DMD's sanity check in LoRA mode: B = 0 makes the fake score the teacher exactly, so no student gradient."""
    stage = _outside_a_trainer(_stage(text_encoder, kind, cfg_scale=1.0, use_gan=False, discriminator=None))
    assert isinstance(stage.fake_score, AdapterView)
    opt = torch.optim.SGD(stage.student.parameters(), lr=1.0)
    before = _snapshot(stage.student.state_dict())
    x, text = stage.encode_batch(_videos(2))
    stats = stage.student_iteration(x, text, stage.negative_embedding(2), opt)
    assert stats["loss_vsd"] == 0 and stats["grad_norm_x_hat_vsd"] == 0
    grads = [p.grad for p in stage.student.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() == 0 for g in grads)
    assert all(torch.equal(v, before[k]) for k, v in stage.student.state_dict().items())
    stage.hparams.cfg_scale = 5.0  # guidance moves the teacher's target away from the fake score's
    assert stage.student_iteration(x, text, stage.negative_embedding(2), opt)["grad_norm_x_hat_vsd"] > 0


def test_critic_iterations_train_the_adapter_and_leave_the_teacher_alone(text_encoder, tmp_path):
    teacher = _teacher()
    pristine = copy.deepcopy(teacher).eval()
    stage = _stage(text_encoder, teacher=teacher, max_iterations=3)
    adapter = adapter_parameters(stage.teacher, FAKE_SCORE)
    base = {k: v for k, v in stage.teacher.named_parameters() if k not in adapter}
    assert len(base) == len(list(pristine.parameters()))  # every teacher weight, once
    optimizers = stage.configure_optimizers()
    assert [id(p) for g in optimizers[1].param_groups for p in g["params"]] == [id(p) for p in adapter.values()]
    before_adapter, before_base = _snapshot(adapter), _snapshot(base)
    before_student = _snapshot(stage.student.state_dict())
    stage.iteration = 1  # iterations 1 and 2: critic iterations
    _trainer(tmp_path).fit(stage, train_dataloaders=_loader(4))
    assert stage.iteration == 3
    assert all(torch.equal(v, before_base[k]) for k, v in base.items())
    assert all(torch.equal(v, before_student[k]) for k, v in stage.student.state_dict().items())
    changed = [k for k, v in adapter.items() if not torch.equal(v, before_adapter[k])]
    assert {k for k in adapter if ".lora_B." in k} <= set(changed)  # B left zero: the fake score now differs
    x, t, text = _fixed_inputs()
    with torch.no_grad():
        teacher_v = stage.wan_velocity(stage.teacher, x, t, text)
        assert torch.equal(teacher_v, stage.wan_velocity(pristine, x, t, text))  # the adapter-disabled path
        assert (stage.wan_velocity(stage.fake_score, x, t, text) - teacher_v).abs().max() > 1e-4
        for got, want in zip(stage.teacher_features(x, t, text), block_features(pristine, x, t, text, [0, 1]),
                             strict=True):
            assert torch.equal(got, want)  # the discriminator reads the frozen teacher
    assert all(p.requires_grad for p in adapter.values()) and not any(p.requires_grad for p in base.values())


def test_critic_iteration_with_gradient_checkpointing_equals_without(text_encoder):
    """Checkpointed teacher blocks recompute the fake score's forward in backward: the stage keeps the adapter on."""
    results = []
    for checkpointing in (False, True):
        stage = _outside_a_trainer(_stage(text_encoder, use_gan=False, discriminator=None))
        if checkpointing:
            stage.teacher.enable_gradient_checkpointing()
        opt_fake = stage.configure_optimizers()[1]
        x, text = stage.encode_batch(_videos(2))
        torch.manual_seed(5)
        stage.critic_iteration(x, text, opt_fake, None)
        results.append(_snapshot(dict(stage.fake_score.named_parameters())))
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_keeps_the_adapters_and_resume_is_exact(text_encoder, tmp_path):
    """6 iterations straight vs 3 + resume + 3 (student iterations 0 and 5): identical adapters (fake score and
    student), student and discriminator; the checkpoint holds the fake-score adapter but no teacher weight.
    The split is at an epoch boundary (3 batches per epoch): a shuffled loader does not resume mid-epoch exactly."""
    lora = LORA | {"student": True}

    def fresh(max_iterations: int):
        L.seed_everything(0, verbose=False)
        return _stage(text_encoder, max_iterations=max_iterations, lora=lora)

    straight = fresh(6)
    L.seed_everything(1, verbose=False)
    _trainer(tmp_path / "a").fit(straight, train_dataloaders=_loader(6))
    first = fresh(3)
    L.seed_everything(1, verbose=False)
    trainer = _trainer(tmp_path / "b")
    trainer.fit(first, train_dataloaders=_loader(6))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    teacher_keys = {k for k in ckpt["state_dict"] if k.startswith("teacher.")}
    assert teacher_keys == {f"teacher.{k}" for k in adapter_parameters(first.teacher, FAKE_SCORE)}
    assert not any(k.startswith("fake_score.") for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 3
    assert ckpt["tmd_lightning"]["lora"] == {"adapter": STUDENT, **first.lora.record()}
    resumed = fresh(6)
    L.seed_everything(123, verbose=False)
    _trainer(tmp_path / "c").fit(resumed, train_dataloaders=_loader(6), ckpt_path=tmp_path / "half.ckpt",
                                 weights_only=False)
    assert resumed.iteration == straight.iteration == 6
    init = fresh(1)
    for name in ("fake_score", "student", "discriminator"):
        a, b = dict(getattr(straight, name).named_parameters()), dict(getattr(resumed, name).named_parameters())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        start = dict(getattr(init, name).named_parameters())
        assert any(not torch.equal(a[k], start[k]) for k in a), f"{name} never trained"


# ------------------------------------------------------------------------------------------------ memory
def _held(module: torch.nn.Module) -> tuple[int, int]:
    """(tensors, bytes) of the distinct storages behind `module`'s parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return len(storages), sum(storages.values())


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def test_lora_fake_score_drops_one_copy_of_the_teacher(text_encoder):
    full = _outside_a_trainer(_stage(text_encoder, use_gan=False, discriminator=None, lora=None))
    lora = _outside_a_trainer(_stage(text_encoder, use_gan=False, discriminator=None))
    teacher_numel = sum(p.numel() for p in _teacher().parameters())
    adapter = adapter_parameters(lora.teacher, FAKE_SCORE)
    adapter_numel = sum(p.numel() for p in adapter.values())
    assert 0 < adapter_numel < teacher_numel / 5
    (full_tensors, full_bytes), (lora_tensors, lora_bytes) = _held(full), _held(lora)
    fake_tensors = len(list(full.fake_score.parameters())) + len(list(full.fake_score.buffers()))
    assert full_tensors - lora_tensors == fake_tensors - len(adapter)
    # a teacher copy (float32 weights and rope tables) minus the float32 adapters
    assert full_bytes - lora_bytes == _held(_teacher())[1] - 4 * adapter_numel
    x, text = full.encode_batch(_videos(2))
    states = []
    for stage in (full, lora):
        opt_fake = stage.configure_optimizers()[1]
        stage.critic_iteration(x, text, opt_fake, None)
        states.append(_optimizer_state_bytes(opt_fake))
    assert states == [2 * 4 * teacher_numel, 2 * 4 * adapter_numel]  # AdamW: exp_avg + exp_avg_sq


# ------------------------------------------------------------------------------------------------ LoRA student
@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_lora_student_trains_adapters_only_and_exports_merged(text_encoder, tmp_path, kind):
    stage = _stage(text_encoder, kind, max_iterations=2, lora=LORA | {"student": True})
    own = {"delta_embedder", "inner_fusion"} if kind == "tmd" else set()
    adapter = {f"student.{k}": p for k, p in adapter_parameters(stage.student, STUDENT).items()}
    expected = {n for n, _ in stage.named_parameters() if n.startswith("student.") and
                (n in adapter or n.split(".")[1] in own)}
    opt_student = stage.configure_optimizers()[0]
    names = {id(p): n for n, p in stage.named_parameters()}
    assert {names[id(p)] for g in opt_student.param_groups for p in g["params"]} == expected
    frozen = {n: p for n, p in stage.student.named_parameters() if f"student.{n}" not in expected}
    before_frozen, before_adapter = _snapshot(frozen), _snapshot(adapter)
    trainer = _trainer(tmp_path)
    trainer.fit(stage, train_dataloaders=_loader(4))  # a student and a critic iteration
    assert all(torch.equal(p, before_frozen[n]) for n, p in frozen.items())
    assert any(not torch.equal(p, before_adapter[n]) for n, p in adapter.items() if ".lora_B." in n)

    stage.export_pretrained(str(tmp_path / "export"))
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    assert not any("lora" in k for k in _plain_keys(tmp_path / "export"))
    exported = load_pretrained_stage(tmp_path / "export", PixelCodec(4), text_encoder).eval()
    from_ckpt = load_checkpoint_stage(tmp_path / "d.ckpt", PixelCodec(4), text_encoder).eval()
    stage.eval()
    noise, text = stage.initial_noise([0, 1], (48, 3, 4, 4)), text_encoder(all_captions()[:2])
    with torch.no_grad():
        want = stage.sample_latents(noise, text, seeds=[0, 1])
        for sampler in (exported, from_ckpt):
            assert type(sampler.network) is type(stage.student)
            torch.testing.assert_close(sampler.sample_latents(noise, text, seeds=[0, 1]), want, rtol=1e-4,
                                       atol=1e-5)
    videos = [s.generate(all_captions()[:2], [0, 1], 9, 16, 16) for s in (stage, exported)]
    assert (videos[0].int() - videos[1].int()).abs().max() <= 1  # uint8 rounding of float-close latents
    student = load_student(tmp_path / "d.ckpt")  # a later stage can start from it: a plain network
    offline = export_checkpoint(tmp_path / "d.ckpt", tmp_path / "offline")  # `python -m tmd_lightning.export`
    for network in (student, type(student).from_pretrained(str(offline))):
        plain = network.state_dict()
        assert plain.keys() == exported.network.state_dict().keys()
        for k, v in exported.network.state_dict().items():
            torch.testing.assert_close(plain[k], v, rtol=0, atol=0)


def _plain_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        return list(f.keys())
