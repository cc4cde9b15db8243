"""End to end through the real entry points: fit (teacher) -> TensorBoard events -> export -> sample -> read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tb_events import hparams_of
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tmd_lightning.data import get_backend, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.transformer_config.num_layers=2", "model.transformer_config.attention_head_dim=16",
    "model.transformer_config.ffn_dim=64", "model.transformer_config.freq_dim=32",
]


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("fit")
    _run("tmd_lightning.fit", "experiment=teacher", "trainer.max_steps=20", "trainer.val_check_interval=10",
         "callbacks.toy_eval.every_n_steps=10", "callbacks.toy_eval.sampler.steps=2",
         "callbacks.model_checkpoint.every_n_train_steps=10", "data.toy.videos_per_caption=1",
         "data.toy.val_videos_per_caption=1", "data.batch_size=8", f"paths.root_dir={work}", *TINY, cwd=work)
    return work


@pytest.mark.slow
def test_teacher_fit_leaves_loss_curve_videos_checkpoint_and_export(teacher_run: Path) -> None:
    latest = teacher_run / "logs" / "teacher" / "latest"
    assert latest.is_symlink() and (latest / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(latest / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    assert len(losses) >= 2 and losses[-1].step >= 19
    assert all(torch.isfinite(torch.tensor(e.value)) for e in losses)
    assert "toy/acc_joint" in events.Tags()["scalars"]
    videos = events.Images("toy/samples")  # add_video writes an animated-GIF image summary
    # 8 clips of 16x16, upscaled to 64 px, tiled 4 x 2 with 2 px borders
    assert videos and videos[-1].encoded_image_string[:3] == b"GIF"
    assert (videos[-1].width, videos[-1].height) == (2 + 4 * 66, 2 + 2 * 66)
    legend = events.Tensors("toy/samples/legend/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert legend.count("(seed 0) |") == 8 and "| 2 | 4 |" in legend
    params, metrics = hparams_of(latest / "tensorboard")  # the HParams tab: resolved config, final eval metrics
    assert params["trainer/max_steps"] == 20 and params["task_name"] == "teacher"
    assert params["callbacks/toy_eval/sampler/steps"] == 2 and params["paths/root_dir"] == str(teacher_run)
    assert {"toy/acc_joint", "toy/fd", "toy/effective_nfe"} <= set(metrics)
    assert {"toy/acc_joint", "toy/fd"} <= set(events.Tags()["scalars"])  # logged at the end under the same names
    curve = (latest / "toy_eval.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) >= 3
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(str(latest / "export" / "transformer"))
    assert exported.config.num_layers == 2


@pytest.mark.slow
def test_sample_writes_videos_the_reader_reads_back(teacher_run: Path) -> None:
    export = teacher_run / "logs" / "teacher" / "latest" / "export" / "transformer"
    out = teacher_run / "samples"
    proc = _run("tmd_lightning.sample", f"checkpoint={export}", "prompts=[a red circle moving left,a blue square "
                "moving up]", "seeds=[0,1]", "sampler.steps=3", f"output_dir={out}", f"paths.root_dir={teacher_run}",
                cwd=teacher_run)
    assert "effective NFE: 6" in proc.stdout and "seconds per video" in proc.stdout
    entries = read_manifest(out / "manifest.csv")
    assert len(entries) == 4 and {e.caption for e in entries} == {"a red circle moving left", "a blue square moving up"}
    backend = get_backend("auto")
    for e in entries:  # H.264 yuv420p, nearest-upscaled x16 to the default 256 px
        assert backend.read(e.path, 9).shape == (9, 256, 256, 3) and "_seed" in e.path.name
    assert (out / "videos" / "a-red-circle-moving-left_seed1.mp4").is_file()
    assert (out / "videos" / "contact_sheet.png").is_file() and (out / "videos" / "grid.gif").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["effective_nfe"] == 6 and "toy" in summary and 0 <= summary["toy"]["acc_joint"] <= 1
    assert summary["toy"]["toy_fd"] > 0 and summary["toy"]["toy_fd_real_count"] == 192  # reference written on use


@pytest.mark.slow
def test_sample_from_lightning_checkpoint_matches_export(teacher_run: Path) -> None:
    """The raw checkpoint (no EMA) and the EMA export are different weights; both must load and sample."""
    ckpt = teacher_run / "logs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"
    out = teacher_run / "samples_ckpt"
    _run("tmd_lightning.sample", f"checkpoint={ckpt}", "prompts=[a red circle moving left]", "seeds=[0]",
         "sampler.steps=2", f"output_dir={out}", f"paths.root_dir={teacher_run}", *TINY, cwd=teacher_run)
    assert len(read_manifest(out / "manifest.csv")) == 1


@pytest.mark.slow
def test_export_checkpoint_writes_the_ema_weights(teacher_run: Path, tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    from tmd_lightning.checkpoints import export_checkpoint

    ckpt = teacher_run / "logs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "exported")
    loaded = WanTransformer3DModel.from_pretrained(str(out))
    shadow = next(s for k, s in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("EMA"))
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param.detach(), shadow["shadow"][name])
    # the run's own end-of-training export is the same EMA state (last.ckpt is written at the final step)
    final = WanTransformer3DModel.from_pretrained(str(ckpt.parent.parent / "export" / "transformer"))
    for (name, a), (_, b) in zip(loaded.named_parameters(), final.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.fixture(scope="module")
def adapt_head_run(teacher_run: Path) -> Path:
    """Stage 1 from the tiny teacher above (H = 1 of its 2 blocks), as `experiment=adapt_head` runs it."""
    teacher = teacher_run / "logs" / "teacher" / "latest" / "export" / "transformer"
    _run("tmd_lightning.fit", "experiment=adapt_head", f"stage.student.teacher={teacher}", "trainer.max_steps=6",
         "trainer.log_every_n_steps=1",
         "trainer.val_check_interval=3", "callbacks.toy_eval.every_n_steps=3", "data.toy.videos_per_caption=1",
         "data.toy.val_videos_per_caption=1", "data.batch_size=8", f"paths.root_dir={teacher_run}", cwd=teacher_run)
    return teacher_run


@pytest.mark.slow
def test_adapt_head_fit_leaves_a_checkpoint_distill_finds(adapt_head_run: Path) -> None:
    latest = adapt_head_run / "logs" / "adapt_head" / "latest"
    ckpt = latest / "checkpoints" / "last.ckpt"
    assert latest.is_symlink() and ckpt.is_file()
    meta = torch.load(ckpt, map_location="cpu", weights_only=False)["tmd_lightning"]
    assert meta["network_class"] == "TMDTransformer" and meta["network_config"]["head_blocks"] == 1
    events = EventAccumulator(str(latest / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/mse", "train/frac_flow_map", "val/loss", "toy/acc_joint", "toy/effective_nfe",
                "diagnostics/motion", "diagnostics/motion_real", "diagnostics/diversity", "diagnostics/saturation"):
        assert tag in tags, tag
    assert events.Scalars("toy/effective_nfe")[-1].value == pytest.approx(2 * (1 + 1 / 2))  # M2 N2 H1 of L2


@pytest.mark.slow
def test_sample_tmd_checkpoint_and_its_export_give_the_same_videos(adapt_head_run: Path) -> None:
    ckpt = adapt_head_run / "logs" / "adapt_head" / "latest" / "checkpoints" / "last.ckpt"
    export = adapt_head_run / "logs" / "adapt_head" / "latest" / "export" / "student"
    args = ["prompts=[a red circle moving left,a blue square moving up]", "seeds=[0]", "sampler.M=1",
            "sampler.N=2", f"paths.root_dir={adapt_head_run}"]
    a = _run("tmd_lightning.sample", f"checkpoint={ckpt}", f"output_dir={adapt_head_run / 'tmd_ckpt'}", *args,
             cwd=adapt_head_run)
    _run("tmd_lightning.sample", f"checkpoint={export}", f"output_dir={adapt_head_run / 'tmd_export'}", *args,
         cwd=adapt_head_run)
    assert "effective NFE: 1.5 " in a.stdout  # M (1 + (N - 1) H / L) = 1 (1 + 1/2)
    backend = get_backend("auto")
    for name in ("a-red-circle-moving-left_seed0.mp4", "a-blue-square-moving-up_seed0.mp4"):
        one = backend.read(adapt_head_run / "tmd_ckpt" / "videos" / name, 9)
        two = backend.read(adapt_head_run / "tmd_export" / "videos" / name, 9)
        assert (one == two).all()
    bad = subprocess.run([sys.executable, "-m", "tmd_lightning.sample", f"checkpoint={export}", "sampler.steps=4",
                          f"paths.root_dir={adapt_head_run}"], cwd=adapt_head_run, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert bad.returncode != 0 and "no sampler option(s) ['steps']" in bad.stderr


def _distill(run: Path, experiment: str, *extra: str) -> Path:
    teacher = run / "logs" / "teacher" / "latest" / "export" / "transformer"
    _run("tmd_lightning.fit", f"experiment={experiment}", f"stage.teacher.pretrained={teacher}",
         "model.disc_blocks=[0,1]", "stage.max_iterations=7", "trainer.log_every_n_steps=1",
         "callbacks.toy_eval.every_n_steps=6", "data.toy.videos_per_caption=1", "data.toy.val_videos_per_caption=1",
         "data.batch_size=4", f"paths.root_dir={run}", *extra, cwd=run)
    return run / "logs" / experiment / "latest"


@pytest.mark.slow
def test_distill_finds_stage1_logs_everything_and_exports(adapt_head_run: Path) -> None:
    latest = _distill(adapt_head_run, "distill", "callbacks.ema.enabled=true")
    events = EventAccumulator(str(latest / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss_vsd", "train/loss_gan_generator", "train/loss_student", "train/loss_fake_score",
                "train/loss_discriminator", "train/grad_ratio_gan_vsd", "train/disc_acc_real", "train/disc_acc_fake",
                "grad_norm/student", "grad_norm/fake_score", "grad_norm/discriminator", "train/phase_student",
                "toy/acc_joint"}
    assert expected <= tags, expected - tags
    assert any(t.startswith("lr-AdamW") for t in tags)
    phases = [e.value for e in events.Scalars("train/phase_student")]
    assert phases[:6] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    ckpt = torch.load(latest / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert ckpt["distill"]["iteration"] == ckpt["global_step"] == 7
    ema = next(s for k, s in ckpt["callbacks"].items() if k.startswith("EMA"))
    from tmd_lightning.models import TMDTransformer

    exported = TMDTransformer.from_pretrained(str(latest / "export" / "student"))
    for name, param in exported.named_parameters():  # the export is the student's EMA
        torch.testing.assert_close(param.detach(), ema["shadow"][name])
    proc = _run("tmd_lightning.sample", f"checkpoint={latest / 'export' / 'student'}", "prompts=[a red circle "
                "moving left]", "seeds=[0]", f"output_dir={adapt_head_run / 'distilled'}",
                f"paths.root_dir={adapt_head_run}", cwd=adapt_head_run)
    assert "effective NFE: 3 " in proc.stdout  # M2 N2, H1 of L2


@pytest.mark.slow
def test_distill_dmd2_runs_and_samples(adapt_head_run: Path) -> None:
    teacher = adapt_head_run / "logs" / "teacher" / "latest" / "export" / "transformer"
    latest = _distill(adapt_head_run, "distill_dmd2", f"stage.student.pretrained={teacher}")
    proc = _run("tmd_lightning.sample", f"checkpoint={latest / 'checkpoints' / 'last.ckpt'}",
                "prompts=[a red circle moving left]", "seeds=[0]", "sampler.M=3",
                f"output_dir={adapt_head_run / 'dmd2'}", f"paths.root_dir={adapt_head_run}", cwd=adapt_head_run)
    assert "effective NFE: 3 " in proc.stdout
    export = latest / "export" / "student"
    assert json.loads((export / "sampling.json").read_text())["sampler"]["kind"] == "few_step"
    proc = _run("tmd_lightning.sample", f"checkpoint={export}", "prompts=[a red circle moving left]", "seeds=[0]",
                f"output_dir={adapt_head_run / 'dmd2_export'}", f"paths.root_dir={adapt_head_run}", cwd=adapt_head_run)
    assert "effective NFE: 2 " in proc.stdout  # the DMD2-v sampler's default M = 2, not the teacher's 50 x 2


@pytest.mark.parametrize("model", ["teacher", "TMD student"])
def test_sample_dtype_bfloat16_on_cpu(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m tmd_lightning.sample dtype=bfloat16` (in process): the shipped toy teacher, and a TMD student built
    from it, sample with bf16 weights (diffusers' float32-kept modules float32) on the CPU, and their videos are the
    float32 run's up to bf16 rounding."""
    from hydra import compose, initialize_config_dir

    from tmd_lightning import sample
    from tmd_lightning.config import CONFIG_DIR
    from tmd_lightning.models import TOY_MODEL_DIR, TMDTransformer, load_transformer

    overrides = ["prompts=[a red circle moving left]", "seeds=[0]", "toy_reference=null", "sampler.steps=2",
                 f"paths.root_dir={tmp_path}"]
    if model == "TMD student":
        student = TMDTransformer.from_teacher(load_transformer(pretrained=TOY_MODEL_DIR), head_blocks=1)
        student.save_pretrained(tmp_path / "student")
        overrides = [*overrides[:3], f"checkpoint={tmp_path / 'student'}", overrides[4]]
    networks = []
    prepare = sample.prepare_stage

    def prepared(*args):  # the network as `sample` runs it
        stage = prepare(*args)
        networks.append(stage.network)
        return stage

    monkeypatch.setattr(sample, "prepare_stage", prepared)
    videos = {}
    for dtype in ("bfloat16", "float32"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("sample", overrides=[*overrides, f"dtype={dtype}", f"output_dir={tmp_path / dtype}"])
        summary = sample.run(cfg)
        assert summary["dtype"] == dtype and summary["device"] == "cpu"
        videos[dtype] = torch.stack([torch.from_numpy(get_backend("auto").read(e.path, 9))
                                     for e in read_manifest(tmp_path / dtype / "manifest.csv")]).float()
    weights = {n: p.dtype for n, p in networks[0].named_parameters()}

    def dtype_of(suffix: str) -> torch.dtype:
        return next(d for n, d in weights.items() if n.endswith(suffix))

    assert dtype_of("blocks.0.attn1.to_q.weight") == dtype_of("proj_out.weight") == torch.bfloat16
    assert dtype_of("condition_embedder.time_embedder.linear_1.weight") == torch.float32
    assert {p.dtype for p in networks[1].parameters()} == {torch.float32}
    # of 255, after the MP4 round trip: the teacher's CFG 5 scales bf16's 0.6 % velocity error up to ~3 % in latents
    difference = (videos["bfloat16"] - videos["float32"]).abs().mean()
    assert 0 < difference < 6.0, float(difference)  # measured 3.8 (teacher, CFG 5), 2.1 (TMD student)
