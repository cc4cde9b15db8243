"""`python -m tmd_lightning.evaluate`: table, CSV, Pareto plot and VBench export on the toy."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.evaluate import run

register_resolvers()


@pytest.mark.slow
def test_evaluate_writes_table_csv_plot_and_vbench(tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out", "seeds=[0,1]",
            "prompts=[a red circle moving left,a blue square moving up]", f"vbench_dir={tmp_path}/vbench",
            "toy_reference.videos_per_caption=1",
            "models=[{label: teacher, path: ${model.pretrained}, required: true, samplers: [{steps: 2, cfg: 5.0}, "
            "{steps: 1, cfg: 1.0}]}, {label: absent, path: /nowhere, samplers: [{M: 2}]}]"])
    rows = run(cfg)
    assert [r["sampler"] for r in rows] == ["Euler 2 x CFG 5", "Euler 1, no CFG"]
    assert [r["effective_nfe"] for r in rows] == [4, 1]
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert "| teacher | Euler 2 x CFG 5 |" in table and "absent" not in table
    with open(out / "results.csv") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == 2 and float(read[0]["acc_colour"]) == rows[0]["acc_colour"]
    assert 0 <= rows[0]["acc_joint"] <= 1 and rows[0]["toy_fd"] > 0
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    vb = sorted(p.name for p in (tmp_path / "vbench" / "teacher_Euler_2_x_CFG_5").iterdir())
    assert vb == ["a blue square moving up-0.mp4", "a blue square moving up-1.mp4", "a red circle moving left-0.mp4",
                  "a red circle moving left-1.mp4"]
    import av
    from PIL import Image

    samples = out / "samples" / "teacher_Euler_2_x_CFG_5"
    assert sorted(p.name for p in samples.glob("*.mp4")) == [
        "a-blue-square-moving-up_seed0.mp4", "a-blue-square-moving-up_seed1.mp4",
        "a-red-circle-moving-left_seed0.mp4", "a-red-circle-moving-left_seed1.mp4"]
    for path in [samples / "a-red-circle-moving-left_seed1.mp4", tmp_path / "vbench" / "teacher_Euler_2_x_CFG_5" /
                 "a red circle moving left-0.mp4"]:
        with av.open(str(path)) as container:
            ctx = container.streams.video[0].codec_context
            assert (ctx.pix_fmt, ctx.width, ctx.height) == ("yuv420p", 256, 256)
    assert (samples / "contact_sheet.png").is_file() and Image.open(samples / "grid.gif").n_frames == 9
    grid = Image.open(out / "samples" / "grid.gif")  # both rows side by side, one per (model, sampler)
    assert grid.n_frames == 9 and grid.size[1] > 2 * 64


def test_missing_required_model_is_an_error(tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                             "models=[{label: t, path: /nowhere, required: true, samplers: []}]"])
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        run(cfg)


class _Detector(torch.nn.Module):
    """Same call signature as StyleGAN-V's I3D TorchScript file: pooled clips through a fixed projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 2 * 4 * 4, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1))


@pytest.mark.slow
def test_evaluate_with_fvd_on_real_prompts(tmp_path: Path):
    from tmd_lightning.data.toy_world import generate_toy_dataset
    from tmd_lightning.metrics.fvd import FrechetVideoDistance, I3DFeatures

    torch.manual_seed(0)
    detector = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_Detector().eval()).save(str(detector))
    # 17 frames: the toy codec takes 1 + 2k frames; FVD reads the first 16
    manifest = generate_toy_dataset(tmp_path / "real", 1, 17, 16, seed=3, split="ref")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out", "seeds=[0,1]", "num_frames=17",
            "prompts=[a red circle moving left,a blue square moving up]", "toy_metrics=false",
            f"fvd.detector={detector}", f"fvd.reference={manifest}", "fvd.num_real=20", "samples_per_row=0",
            "models=[{label: teacher, path: ${model.pretrained}, required: true, samplers: [{steps: 1, cfg: 5.0}]}]"])
    rows = run(cfg)
    assert rows[0]["fvd_num_real"] == 20 and rows[0]["fvd_num_fake"] == 4 and "acc_joint" not in rows[0]
    # the same number from the metric directly
    from tmd_lightning.data.backends import get_backend
    from tmd_lightning.data.manifest import read_manifest
    from tmd_lightning.evaluation import generate_videos, load_model

    stage = load_model(cfg.model.pretrained, *(instantiate(cfg.model[k]) for k in ("codec", "text_encoder"))).eval()
    pairs = [(p, s) for p in ["a red circle moving left", "a blue square moving up"] for s in (0, 1)]
    videos, _ = generate_videos(stage, pairs, (17, 16, 16), 64, steps=1, cfg=5.0)
    backend = get_backend("auto")
    fvd = FrechetVideoDistance(I3DFeatures(detector))
    fvd.update(torch.stack([torch.from_numpy(backend.read(e.path, 16)) for e in read_manifest(manifest)[:20]]),
               real=True)
    fvd.update(videos, real=False)
    assert rows[0]["fvd"] == pytest.approx(float(fvd.compute()), rel=1e-6)
    assert "| FVD |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "pareto.png").is_file()


def test_evaluate_dtype_sets_every_models_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """`dtype=bfloat16` reaches every model evaluate loads (diffusers' float32-kept modules stay float32)."""
    import tmd_lightning.evaluate as evaluate

    dtypes = []
    prepare = evaluate.prepare_stage

    def prepared(*args):
        stage = prepare(*args)
        dtypes.append({p.dtype for p in stage.network.parameters()})
        return stage

    monkeypatch.setattr(evaluate, "prepare_stage", prepared)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out", "seeds=[0]", "dtype=bfloat16",
            "prompts=[a red circle moving left]", "toy_metrics=false", "samples_per_row=0",
            "models=[{label: teacher, path: ${model.pretrained}, samplers: [{steps: 1, cfg: 1.0}]}]"])
    rows = run(cfg)
    assert len(rows) == 1 and dtypes == [{torch.bfloat16, torch.float32}]
    assert "cpu, bfloat16 weights" in capsys.readouterr().out
