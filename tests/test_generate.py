"""`python -m tmd_lightning.generate`: a training set sampled by a (tiny random toy) teacher, as MP4s + a manifest that
`data=manifest` reads, or straight into the latent cache that `data=cache` reads. Items equal the teacher's own
samples of (prompt, seed); reruns write only what is missing; two ranks write disjoint shares and the last one merges.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tiny_wan_folder import write_tiny_toy_teacher

import tmd_lightning.data.generation as generation
import tmd_lightning.generate as generate
from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.data import CachedDataModule, CacheError, VideoTextDataModule
from tmd_lightning.data.backends import get_backend
from tmd_lightning.data.manifest import read_manifest
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.evaluation import load_stage

CAPTIONS = all_captions()[:3]
SEED = 11


def _cfg(teacher: Path, output: Path, *overrides: str) -> DictConfig:
    """3 prompts x 2 seeds = 6 items in shards of 2 (3 shards), 2 sampler steps."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("generate", overrides=[
            f"paths.root_dir={teacher.parent}", f"paths.output_dir={teacher.parent}/run", f"checkpoint={teacher}",
            f"output={output}", f"prompts=[{','.join(CAPTIONS)}]", "seeds_per_prompt=2", f"seed={SEED}",
            "sampler.steps=2", "shard_size=2", "batch_size=3", "dtype=float32", "device=cpu", *overrides])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_toy_teacher(tmp_path_factory.mktemp("generate") / "teacher")


@pytest.fixture(scope="module")
def direct(teacher: Path) -> tuple[list[str], list[int], torch.Tensor]:
    """The teacher's own latents of every item, sampled in one batch."""
    cfg = _cfg(teacher, teacher.parent / "unused")
    stage = load_stage(cfg).eval()
    captions = [c for c in CAPTIONS for _ in range(2)]
    seeds = [SEED + i for i in range(6)]
    assert cfg.sampler.cfg == cfg.model.guidance_scale  # `generate` guides as the model does
    with torch.inference_mode():
        latents = stage.generate_latents(captions, seeds, 9, 16, 16, steps=2, cfg=cfg.model.guidance_scale)
    return captions, seeds, latents, stage


@pytest.fixture(scope="module")
def manifest_run(teacher: Path) -> dict:
    return generate.run(_cfg(teacher, teacher.parent / "videos", "rank=0", "world_size=1"))


def test_videos_and_manifest_are_the_teachers_samples_and_train_through_the_datamodule(manifest_run, direct):
    captions, seeds, latents, stage = direct
    out = manifest_run["output"]
    assert manifest_run["manifest"] == out / "manifest.csv" and len(manifest_run["written"]) == 6
    entries = read_manifest(out / "manifest.csv")
    assert [e.caption for e in entries] == captions
    assert [e.path.name for e in entries] == [f"{i:07d}_seed{s}.mp4" for i, s in enumerate(seeds)]
    assert all((e.num_frames, e.height, e.width, e.fps) == (9, 16, 16, 16) for e in entries)
    dm = VideoTextDataModule(train_manifest=str(out / "manifest.csv"), num_frames=9, height=16, width=16,
                             batch_size=6, spatial_multiple=4, num_workers=0)
    dm.setup()
    assert len(dm.train_set) == 6 and not dm.skips.skipped
    items = [dm.train_set[i] for i in range(6)]
    videos = stage.codec.decode(latents)
    for k, (item, caption) in enumerate(zip(items, captions, strict=True)):
        assert item["caption"] == caption and item["video"].shape == (9, 16, 16, 3)
        errors = [(item["video"].float() - v.float()).abs().mean() for v in videos]  # H.264 4:4:4 at crf 10: lossy
        assert errors[k] < 6.0 and all(errors[k] * 5 < e for j, e in enumerate(errors) if j != k)
    assert not list(out.rglob("*.tmp*"))


def test_rerun_writes_only_the_missing_items_and_a_finished_set_loads_no_network(manifest_run, teacher, monkeypatch):
    out = manifest_run["output"]
    (out / "videos" / f"0000003_seed{SEED + 3}.mp4").unlink()  # a video lost, and its shard's record with it
    (out / "shards" / "shard_00001.json").unlink()
    again = generate.run(_cfg(teacher, out, "rank=0", "world_size=1"))
    assert [p.name for p in again["written"]] == [f"0000003_seed{SEED + 3}.mp4"]  # item 2 of shard 1 was kept
    assert again["manifest"].read_text() == (out / "manifest.csv").read_text()

    def forbidden(*a, **k):
        raise AssertionError("a finished set loads no network")

    monkeypatch.setattr(generation, "load_stage", forbidden)
    assert generate.run(_cfg(teacher, out, "rank=0", "world_size=1"))["written"] == []
    with pytest.raises(CacheError, match="another configuration"):
        generate.run(_cfg(teacher, out, "rank=0", "world_size=1", "sampler.steps=3"))


def test_two_ranks_write_disjoint_shares_and_the_last_merges_one_manifest(manifest_run, teacher, monkeypatch):
    out = teacher.parent / "ranked"
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in ("0", "1"):  # as torchrun would start them (here one after the other)
        monkeypatch.setenv("RANK", rank)
        result = generate.run(_cfg(teacher, out))
        shares.append({p.name for p in result["written"]})
        assert (result["manifest"] is None) == (rank == "0")
    names = [f"{i:07d}_seed{SEED + i}.mp4" for i in range(6)]
    assert shares == [{names[0], names[1], names[4], names[5]}, {names[2], names[3]}]  # shards 0, 2 | shard 1
    assert result["manifest"].read_text() == manifest_run["manifest"].read_text()  # all items, in item order
    pyav = get_backend("pyav")
    ranked, single = ([pyav.read(d / "videos" / n, 9).astype(float) for n in names]
                      for d in (out, manifest_run["output"]))
    # The same samples, compared in pixels, not bytes: a rerun's item 3 was sampled in another batch size, which moves
    # float sums by an ulp on some CPUs, and the lossy encoder of the random teacher's noisy frames turns that into
    # other bytes and pixel errors of about 0.5 of 255; two different items differ by about 100.
    for k, video in enumerate(ranked):
        errors = [abs(video - other).mean() for other in single]
        assert errors[k] < 3.0 and all(errors[k] * 10 < e for j, e in enumerate(errors) if j != k)


def test_cache_output_is_served_by_the_cache_datamodule(teacher, direct):
    captions, _, latents, _ = direct
    result = generate.run(_cfg(teacher, teacher.parent / "cache", "rank=0", "world_size=1", "output_format=cache",
                               f"eval_prompts=[{CAPTIONS[0]}]"))
    assert len(result["written"]) == 3 and result["index"]["prompts"]["captions"] == ["", CAPTIONS[0]]
    from tmd_lightning.models.text_encoders import CachedTextEncoder

    dm = CachedDataModule(str(result["output"]), 9, 16, 16, text_length=8, batch_size=6,
                          expect={"model": "toy", "negative_prompt": ""})
    dm.setup()
    assert len(dm.train_set) == 6 and dm.val_set is None
    batch = next(iter(dm._loader(dm.train_set, 6, shuffle=False)))
    assert batch["caption"] == captions
    torch.testing.assert_close(batch["latents"], latents, atol=1e-5, rtol=1e-5)
    encoder = CachedTextEncoder.from_cache(result["output"], max_length=8)
    assert encoder([""]).shape == (1, 8, 64)
    again = generate.run(_cfg(teacher, teacher.parent / "cache", "rank=0", "world_size=1", "output_format=cache",
                              f"eval_prompts=[{CAPTIONS[0]}]"))
    assert again["written"] == [] and again["index"] == result["index"]


def test_prompts_from_a_csv_column(tmp_path):
    from tmd_lightning.evaluation import resolve_prompts

    (tmp_path / "p.csv").write_text("path,caption\na.mp4,a red circle\nb.mp4,\nc.mp4,a blue square\n")
    assert resolve_prompts(str(tmp_path / "p.csv")) == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="no column 'text'"):
        resolve_prompts(str(tmp_path / "p.csv"), "text")
    assert generation.plan_items(["a", "b"], 2, 5) == [(0, "a", 5), (1, "a", 6), (2, "b", 7), (3, "b", 8)]
