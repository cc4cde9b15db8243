"""`python -m tmd_lightning.precompute` (docs/method.md §7) on the toy codec and text encoder: what it stores equals
direct encoding, it resumes, it skips and counts bad files, and training from its cache equals training from videos.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file
from tiny_wan_folder import write_toy_videos

import tmd_lightning.data.cache_writer as cache_writer
import tmd_lightning.data.encoding as encoding
import tmd_lightning.precompute as precompute
from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.data import CachedDataModule, CacheError, ManifestError, VideoTextDataModule, get_backend
from tmd_lightning.data.toy_world import all_captions, random_spec, render, write_mp4
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder, TMDTransformer
from tmd_lightning.models.text_encoders import CachedTextEncoder, UnknownPromptError
from tmd_lightning.stages import AdaptHeadStage

CAPTIONS = all_captions()[::5][:8]
PROMPTS = ["a red circle moving left", "a blue square moving up"]


def _cfg(root: Path, output: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("precompute", overrides=[
            f"paths.root_dir={root}", f"paths.output_dir={root}/run", f"output={output}", "data.num_frames=9",
            "data.height=16", "data.width=16", "data.spatial_multiple=4", "data.num_workers=0", "dtype=float32",
            "shard_size=3", "model.codec.frames_per_latent=1", *overrides])  # K = 1: PixelCodec(4) below


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_toy_videos(root, CAPTIONS, 16, name="train.csv")
    write_toy_videos(root, all_captions()[1:3], 16, seed=1, name="val.csv")
    return root


@pytest.fixture(scope="module")
def cache(videos: Path) -> tuple[Path, dict]:
    """8 train videos in shards of 3 (3, 3, 2), 2 val videos, the negative prompt and two evaluation prompts."""
    out = videos / "cache"
    index = precompute.run(_cfg(videos, out, f"data.train_manifest={videos}/train.csv",
                                f"data.val_manifest={videos}/val.csv", f"prompts=[{','.join(PROMPTS)}]"))["index"]
    return out, index


@pytest.fixture(scope="module")
def toy_text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def _stored(out: Path, index: dict, split: str = "train") -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """(sample record, latents, text) of every stored sample, in order."""
    rows = []
    for shard in index["splits"][split]["shards"]:
        tensors = load_file(str(out / shard["file"]))
        rows += [(s, tensors[f"latents.{j}"], tensors[f"text.{j}"]) for j, s in enumerate(shard["samples"])]
    return rows


def test_cache_equals_direct_encoding_of_the_same_videos(cache, toy_text_encoder) -> None:
    out, index = cache
    stored = _stored(out, index)
    assert [s["caption"] for s, _, _ in stored] == CAPTIONS  # manifest order, nothing lost
    assert [len(s["samples"]) for s in index["splits"]["train"]["shards"]] == [3, 3, 2]
    backend, codec = get_backend("pyav"), PixelCodec(4)
    for sample, latents, text in stored:
        clip = torch.from_numpy(backend.read(sample["path"], 9))[None]  # the same file, decoded independently
        assert torch.equal(latents, codec.encode(clip)[0])
        direct = toy_text_encoder([sample["caption"]])[0]  # (8, 64), zero past the caption's tokens
        n = int(toy_text_encoder.tokenizer(sample["caption"]).attention_mask.count(1))
        assert text.shape == (n, 64) == tuple(sample["text_shape"]) and n == 6  # 5 words + </s>, no padding
        torch.testing.assert_close(text, direct[:n], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(direct[n:]) == 0  # trimming dropped only zeros
    assert index["latent_shape"] == [48, 9, 4, 4] and index["text_dim"] == 64
    assert index["config"]["codec"] == {"_target_": "tmd_lightning.models.PixelCodec", "patch": 4,
                                        "frames_per_latent": 1}
    assert index["config"]["text_encoder"]["path"] == str(TOY_MODEL_DIR)
    assert [s["caption"] for s, _, _ in _stored(out, index, "val")] == all_captions()[1:3]


def test_prompts_are_served_without_the_text_encoder(cache, toy_text_encoder) -> None:
    out, index = cache
    assert index["prompts"]["captions"] == ["", *PROMPTS]  # the toy's negative prompt is the empty caption
    cached = CachedTextEncoder.from_cache(out, max_length=8)
    torch.testing.assert_close(cached(["", PROMPTS[1], ""]), toy_text_encoder(["", PROMPTS[1], ""]), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(UnknownPromptError, match="no cached text embedding for .'a green circle moving up'"):
        cached(["a green circle moving up"])
    # the stand-in arrives through the model config's own target, as data=cache sets it
    stand_in = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel", cache_dir=out)
    assert isinstance(stand_in, CachedTextEncoder) and stand_in.dim == 64 and list(stand_in.parameters()) == []


def test_rerun_of_a_finished_cache_loads_no_encoder(cache, videos, monkeypatch) -> None:
    out, index = cache
    monkeypatch.setattr(encoding, "instantiate", _forbidden_encoder(encoding.instantiate))
    again = precompute.run(_cfg(videos, out, f"data.train_manifest={videos}/train.csv",
                                f"data.val_manifest={videos}/val.csv", f"prompts=[{','.join(PROMPTS)}]"))
    assert again["written"] == [] and again["index"] == index


def _forbidden_encoder(instantiate):
    def guarded(config, *args, **kwargs):
        if "_target_" in config and "models" in config["_target_"]:
            raise AssertionError(f"loaded {config['_target_']}")
        return instantiate(config, *args, **kwargs)

    return guarded


def test_killed_run_resumes_with_the_missing_shards_only(cache, videos, monkeypatch) -> None:
    out = videos / "resumed"
    args = (f"data.train_manifest={videos}/train.csv",)
    written: list[str] = []
    real_write = cache_writer.write_shard

    def write_then_die(path, *a, **k):
        if written:  # the second shard: a kill halfway through its write leaves a partial temporary file
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        written.append(path.name)
        real_write(path, *a, **k)

    monkeypatch.setattr(cache_writer, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        precompute.run(_cfg(videos, out, *args))
    assert written == ["shard_00000.safetensors"] and not (out / "index.json").exists()  # index comes last
    first = (out / "train" / "shard_00000.safetensors").stat().st_mtime_ns

    written.clear()

    def record_write(path, *a, **k):
        written.append(path.name)
        real_write(path, *a, **k)

    monkeypatch.setattr(cache_writer, "write_shard", record_write)
    result = precompute.run(_cfg(videos, out, *args))
    index = result["index"]
    assert written == ["shard_00001.safetensors", "shard_00002.safetensors"]
    assert not list((out / "train").glob("*.tmp"))  # the partial file was replaced by the finished shard
    assert (out / "train" / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert [p.name for p in result["written"]] == written
    reference = _stored(*cache)
    for (s, z, t), (rs, rz, rt) in zip(_stored(out, index), reference, strict=True):
        assert s == rs and torch.equal(z, rz) and torch.equal(t, rt)

    # a shard corrupted afterwards (truncated) is redone, and only that one
    shard = out / "train" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    written.clear()
    precompute.run(_cfg(videos, out, *args))
    assert written == ["shard_00001.safetensors"]


def test_bad_files_are_skipped_counted_and_recorded(videos: Path, tmp_path: Path) -> None:
    shutil.copy(videos / "0_000.mp4", tmp_path / "good.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 3000)
    write_mp4(tmp_path / "short.mp4", render(random_spec(np.random.default_rng(0), "red", "square", "up"), 5, 16))
    (tmp_path / "m.csv").write_text("path,caption\ngood.mp4,a red square moving up\ncorrupt.mp4,a red square moving up"
                                    "\nshort.mp4,a red square moving up\nmissing.mp4,a red square moving up\n"
                                    "good.mp4,\n")
    args = (f"data.train_manifest={tmp_path}/m.csv",)
    with pytest.raises(ManifestError, match="more than data.max_skip_fraction"):  # the DataModule's limit applies
        precompute.run(_cfg(tmp_path, tmp_path / "c0", *args))
    index = precompute.run(_cfg(tmp_path, tmp_path / "c1", *args, "data.max_skip_fraction=0.9"))["index"]
    train = index["splits"]["train"]
    assert train["num_rows"] == 5 and train["num_samples"] == 1 and train["num_skipped"] == 4
    reasons = {Path(r["path"]).name: r["reason"] for r in train["skipped"]}
    assert set(reasons) == {"corrupt.mp4", "short.mp4", "missing.mp4", "good.mp4"}
    assert "file not found" in reasons["missing.mp4"] and "empty caption" in reasons["good.mp4"]
    assert "need 9" in reasons["short.mp4"]
    assert [s["path"] for s in train["shards"][0]["samples"]] == [str(tmp_path / "good.mp4")]
    dm = CachedDataModule(str(tmp_path / "c1"), 9, 16, 16, text_length=8)
    dm.setup()
    assert len(dm.train_set) == 1 and len(dm.skips.skipped) == 4 and dm.skips.seen == 5


def test_two_ranks_encode_disjoint_shares_and_the_last_writes_the_index(cache, videos, monkeypatch) -> None:
    """torchrun's RANK / WORLD_SIZE (here two processes one after the other): shards 0, 2 of the training split
    (3, 3, 2 samples) go to rank 0, shard 1 and the validation shard to rank 1; the last one done writes the index,
    equal to a single process's."""
    out = videos / "ranked"
    args = (f"data.train_manifest={videos}/train.csv", f"data.val_manifest={videos}/val.csv",
            f"prompts=[{','.join(PROMPTS)}]")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        result = precompute.run(_cfg(videos, out, *args))
        shares.append({f"{p.parent.name}/{p.name}" for p in result["written"]})
        assert (result["index"] is None) == (rank == "0") and (out / "index.json").is_file() == (rank == "1")
    assert shares == [{"train/shard_00000.safetensors", "train/shard_00002.safetensors"},
                      {"train/shard_00001.safetensors", "val/shard_00000.safetensors"}]
    index, reference = result["index"], cache[1]
    assert index["splits"] == reference["splits"] and index["prompts"] == reference["prompts"]
    for (s, z, t), (rs, rz, rt) in zip(_stored(out, index), _stored(*cache), strict=True):
        assert s == rs and torch.equal(z, rz) and torch.equal(t, rt)


def test_existing_cache_of_another_configuration_is_an_error(cache, videos) -> None:
    out, _ = cache
    with pytest.raises(CacheError, match=r'already holds a cache made with another configuration:\n  dtype: cache '
                                         r'has "float32", run has "bfloat16"'):
        precompute.run(_cfg(videos, out, f"data.train_manifest={videos}/train.csv", "dtype=bfloat16"))


# ----------------------------------------------------------------------- training from the cache = from videos


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def _train(datamodule: L.LightningDataModule, text_encoder: torch.nn.Module, tiny_wan_config: dict) -> list[float]:
    """Three adapt_head steps of a tiny seeded student; the seed also fixes shuffling and every draw of the loss."""
    L.seed_everything(0)
    student = TMDTransformer.from_teacher(WanTransformer3DModel(**tiny_wan_config), head_blocks=1)
    stage = AdaptHeadStage(student, PixelCodec(4), text_encoder, optimizer=partial(torch.optim.AdamW, lr=1e-3),
                           negative_prompt="", cond_dropout=0.5)
    losses = _Losses()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[losses])
    trainer.fit(stage, datamodule=datamodule)
    return losses.values


@pytest.mark.slow
def test_adapt_head_from_the_cache_equals_adapt_head_from_the_videos(cache, videos, toy_text_encoder,
                                                                     tiny_wan_config) -> None:
    out, _ = cache
    raw = VideoTextDataModule(train_manifest=str(videos / "train.csv"), num_frames=9, height=16, width=16,
                              batch_size=2, spatial_multiple=4)
    cached = CachedDataModule(str(out), 9, 16, 16, text_length=8, batch_size=2)
    from_videos = _train(raw, toy_text_encoder, tiny_wan_config)
    from_cache = _train(cached, CachedTextEncoder.from_cache(out, max_length=8), tiny_wan_config)
    assert len(from_videos) == 3 and len(set(from_videos)) == 3  # three different batches
    torch.testing.assert_close(torch.tensor(from_cache), torch.tensor(from_videos), rtol=1e-5, atol=1e-6)
