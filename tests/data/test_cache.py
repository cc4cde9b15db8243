"""Precomputed caches, data side (docs/method.md §7): shard files, collate padding, and the cached DataModule's checks.

The caches here are written by hand (shards + index), so the DataModule is tested apart from `precompute`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from tmd_lightning.data.cache import (
    INDEX_FILE,
    CachedDataModule,
    CacheError,
    collate_cached,
    read_shard_record,
    shard_path,
    write_shard,
)

CONFIG = {"model": "toy", "codec": {"_target_": "tmd_lightning.models.PixelCodec", "patch": 4},
          "text_encoder": {"_target_": "tmd_lightning.models.TextEncoder.from_pretrained", "path": "/a/toy_wan",
                           "max_length": 8, "model_class": "T5EncoderModel"},
          "num_frames": 9, "height": 16, "width": 16, "frame_stride": 1, "dtype": "float32"}
NEGATIVE = "ugly"
LATENT = (48, 9, 4, 4)
DIM = 64


def _sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct latents and a text embedding of length 2 + i % 5 (no zeros inside, so padding is visible)."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(LATENT, generator=g), torch.rand(2 + i % 5, DIM, generator=g) + 0.5


def _write_cache(root: Path, sizes: dict[str, list[int]], config: dict = CONFIG) -> Path:
    """A cache with `sizes[split]` samples per shard; one skipped file recorded in the first train shard."""
    splits, n = {}, 0
    for split, shard_sizes in sizes.items():
        shards = []
        for k, size in enumerate(shard_sizes):
            pairs = [_sample(n + j) for j in range(size)]
            samples = [{"caption": f"caption {n + j}", "path": f"/v/{n + j}.mp4", "latent_shape": list(LATENT),
                        "text_shape": list(t.shape)} for j, (_, t) in enumerate(pairs)]
            n += size
            skipped = [{"path": "/v/bad.mp4", "reason": "corrupt"}] if (split, k) == ("train", 0) else []
            record = {"signature": "x", "rows": [], "samples": samples, "skipped": skipped}
            write_shard(shard_path(root, split, k), [z for z, _ in pairs], [t for _, t in pairs], record)
            shards.append({"file": f"{split}/shard_{k:05d}.safetensors", "samples": samples, "skipped": skipped})
        skipped = [r for s in shards for r in s["skipped"]]
        splits[split] = {"shards": shards, "skipped": skipped, "num_rows": sum(shard_sizes) + len(skipped)}
    index = {"version": 1, "config": config, "prompts": {"captions": [NEGATIVE, "a prompt"]}, "splits": splits}
    (root / INDEX_FILE).write_text(json.dumps(index))
    return root


def _dm(root: Path, **kw) -> CachedDataModule:
    args = dict(cache_dir=str(root), num_frames=9, height=16, width=16, text_length=8, batch_size=4,
                expect={"model": "toy", "codec": CONFIG["codec"], "text_encoder": CONFIG["text_encoder"],
                        "negative_prompt": NEGATIVE})
    return CachedDataModule(**(args | kw))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_cache(tmp_path_factory.mktemp("cache"), {"train": [4, 4, 2], "val": [3]})


# ------------------------------------------------------------------------------------------------------ shards


def test_shard_round_trip_and_record(tmp_path: Path) -> None:
    pairs = [_sample(i) for i in range(3)]
    record = {"samples": [{"caption": str(i)} for i in range(3)], "skipped": []}
    path = shard_path(tmp_path, "train", 7)
    write_shard(path, [z for z, _ in pairs], [t.to(torch.bfloat16) for _, t in pairs], record)
    assert path.name == "shard_00007.safetensors" and not list(path.parent.glob("*.tmp"))
    assert read_shard_record(path) == record
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for j, (z, t) in enumerate(pairs):
        assert torch.equal(tensors[f"latents.{j}"], z)
        assert tensors[f"text.{j}"].dtype == torch.bfloat16 and tensors[f"text.{j}"].shape == t.shape


def test_incomplete_or_corrupt_shards_are_not_reused(tmp_path: Path) -> None:
    z, t = _sample(0)
    record = {"samples": [{"caption": "a"}], "skipped": []}
    good = shard_path(tmp_path, "train", 0)
    write_shard(good, [z], [t], record)
    data = good.read_bytes()
    assert read_shard_record(tmp_path / "train" / "missing.safetensors") is None
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])  # a write killed halfway
    assert read_shard_record(truncated) is None
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert read_shard_record(garbage) is None
    lying = tmp_path / "lying.safetensors"  # its record names two samples, it holds one
    write_shard(lying, [z], [t], {"samples": [{"caption": "a"}, {"caption": "b"}], "skipped": []})
    assert read_shard_record(lying) is None
    assert read_shard_record(good) == record  # the intact one still reads


def test_a_shard_of_only_skipped_files_is_still_a_finished_shard(tmp_path: Path) -> None:
    record = {"samples": [], "skipped": [{"path": "/x.mp4", "reason": "corrupt"}]}
    write_shard(tmp_path / "s.safetensors", [], [], record)
    assert read_shard_record(tmp_path / "s.safetensors") == record


# ------------------------------------------------------------------------------------------------------ collate


def test_collate_zero_pads_text_to_the_run_length_and_keeps_stored_values() -> None:
    items = [{"latents": z.to(torch.bfloat16), "text": t.to(torch.bfloat16), "caption": f"c{i}"}
             for i, (z, t) in enumerate(_sample(i) for i in (0, 3))]
    batch = collate_cached(items, text_length=8)
    assert batch["latents"].shape == (2, *LATENT) and batch["latents"].dtype == torch.float32
    assert batch["text"].shape == (2, 8, DIM) and batch["text"].dtype == torch.float32
    assert batch["caption"] == ["c0", "c1"]
    for row, it in zip(batch["text"], items, strict=True):
        n = it["text"].shape[0]  # 2 and 5 tokens
        assert torch.equal(row[:n], it["text"].float())
        assert torch.count_nonzero(row[n:]) == 0
    assert torch.equal(batch["latents"][1], items[1]["latents"].float())


def test_collate_rejects_text_longer_than_the_run_length() -> None:
    z, t = _sample(4)  # 6 tokens
    with pytest.raises(CacheError, match="6 tokens, more than the run's text length 4"):
        collate_cached([{"latents": z, "text": t, "caption": "c"}], text_length=4)


# -------------------------------------------------------------------------------------------------- DataModule


def test_datamodule_serves_every_cached_sample_with_padded_text(cache_dir: Path) -> None:
    dm = _dm(cache_dir)
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.val_set) == 3
    seen = {}
    for batch in dm.train_dataloader():
        assert batch["latents"].shape[1:] == LATENT and batch["text"].shape[1:] == (8, DIM)
        for caption, z, t in zip(batch["caption"], batch["latents"], batch["text"], strict=True):
            seen[caption] = (z, t)
    assert len(seen) == 8  # 10 samples, batch 4, drop_last: 2 full batches
    for caption, (z, t) in seen.items():
        ref_z, ref_t = _sample(int(caption.split()[1]))
        assert torch.equal(z, ref_z)
        assert torch.equal(t[: ref_t.shape[0]], ref_t) and torch.count_nonzero(t[ref_t.shape[0]:]) == 0
    val = [c for b in dm.val_dataloader() for c in b["caption"]]
    assert val == ["caption 10", "caption 11", "caption 12"]  # in order, nothing dropped
    assert [r.path for r in dm.skips.skipped] == ["/v/bad.mp4"] and dm.skips.seen == 14


def test_dataset_pickles_for_workers_after_use(cache_dir: Path) -> None:
    dm = _dm(cache_dir)
    dm.setup()
    first = dm.train_set[0]
    clone = pickle.loads(pickle.dumps(dm.train_set))  # open file handles are dropped and reopened
    assert torch.equal(clone[0]["latents"], first["latents"])


def test_missing_or_unfinished_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not a finished precompute cache"):
        _dm(tmp_path).setup()
    (tmp_path / INDEX_FILE).write_text(json.dumps({"version": 0}))
    with pytest.raises(CacheError, match="cache version 0"):
        _dm(tmp_path).setup()


@pytest.mark.parametrize("override,message", [
    ({"num_frames": 5}, "num_frames: cache has 9, run has 5"),
    ({"height": 32, "width": 32}, "height: cache has 16, run has 32"),
    ({"expect": {"model": "wan2.1_t2v_1.3b"}}, 'model: cache has "toy", run has "wan2.1_t2v_1.3b"'),
    ({"expect": {"codec": {"_target_": "tmd_lightning.models.PixelCodec", "patch": 2}}}, "codec: cache has"),
    ({"expect": {"text_encoder": CONFIG["text_encoder"] | {"max_length": 512}}}, "text_encoder: cache has"),
    ({"expect": {"negative_prompt": "blurry"}}, "model.negative_prompt is not among the cached prompts"),
])
def test_a_cache_for_another_configuration_is_a_clear_error(cache_dir: Path, override: dict, message: str) -> None:
    with pytest.raises(CacheError, match="made for another configuration") as info:
        _dm(cache_dir, **override).setup()
    assert message in str(info.value)


def test_where_the_model_lives_is_not_compared(cache_dir: Path) -> None:
    """The same model under another path (another machine), and the cache_dir key data=cache adds, are fine."""
    moved = CONFIG["text_encoder"] | {"path": "/elsewhere/toy_wan", "cache_dir": str(cache_dir)}
    dm = _dm(cache_dir, expect={"model": "toy", "text_encoder": moved, "negative_prompt": NEGATIVE})
    dm.setup()
    assert len(dm.train_set) == 10


def test_a_cache_without_training_samples_is_an_error(tmp_path: Path) -> None:
    _write_cache(tmp_path, {"val": [2]})
    with pytest.raises(CacheError, match="no training samples"):
        _dm(tmp_path).setup()
