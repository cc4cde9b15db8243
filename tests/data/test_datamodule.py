"""VideoTextDataModule (docs/method.md §7): toy batches, counted skips of bad input, clear errors at setup."""

from __future__ import annotations

import shutil

import lightning as L
import numpy as np
import pytest
import torch

from tmd_lightning.data.datamodule import VideoTextDataModule
from tmd_lightning.data.manifest import ManifestError, write_manifest
from tmd_lightning.data.toy_world import all_captions, parse_caption, random_spec, render, write_mp4

N_GOOD = 6


@pytest.fixture(scope="module")
def toy_dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_dm")
    dm = VideoTextDataModule(
        toy={"root": str(root), "videos_per_caption": 1, "val_videos_per_caption": 1}, batch_size=8, val_batch_size=16
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """A folder with N_GOOD good 16 px videos plus a corrupt one and a too-short one (and a missing name)."""
    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    good = []
    for i, caption in enumerate(all_captions()[:: 48 // N_GOOD][:N_GOOD]):
        write_mp4(root / f"good_{i}.mp4", render(random_spec(rng, **parse_caption(caption)), 9, 16))
        good.append({"path": f"good_{i}.mp4", "caption": caption})
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    write_mp4(root / "short.mp4", render(random_spec(rng, "red", "square", "up"), 5, 16))
    return root, good


def _manifest(root, name, rows):
    return str(write_manifest(root / name, rows))


def _iterate(dm, loader):
    """Iterates a dataloader the way Lightning does: every batch passes on_after_batch_transfer."""
    batches = []
    for batch in loader:
        batches.append(dm.on_after_batch_transfer(batch, 0))
    return batches


# ---------------------------------------------------------------------------------------------------- toy world


def test_toy_train_batch(toy_dm):
    assert len(toy_dm.train_set) == 48 and len(toy_dm.val_set) == 48
    batch = toy_dm.on_after_batch_transfer(next(iter(toy_dm.train_dataloader())), 0)
    video = batch["video"]
    assert video.shape == (8, 9, 16, 16, 3)
    assert video.dtype == torch.uint8
    assert len(batch["caption"]) == 8
    assert all(c in all_captions() for c in batch["caption"])
    assert "skipped" not in batch and "num_items" not in batch  # bookkeeping is consumed by the hook
    # real content: background-coloured corners and a bright shape somewhere
    assert video.float().mean() > 16
    assert int(video.amax()) > 150


def test_toy_epoch_has_no_skips_and_counts_items(toy_dm):
    seen_before = toy_dm.skips.seen
    train = _iterate(toy_dm, toy_dm.train_dataloader())
    assert sum(len(b["caption"]) for b in train) == 48  # 48 / 8: nothing dropped
    val = _iterate(toy_dm, toy_dm.val_dataloader())
    assert [len(b["caption"]) for b in val] == [16, 16, 16]
    assert [c for b in val for c in b["caption"]] == all_captions()  # val is ordered and starts at frame 0
    assert toy_dm.skips.skipped == []
    assert toy_dm.skips.seen == seen_before + 96


def test_toy_data_written_once(toy_dm):
    root = toy_dm.hparams.toy["root"]
    from pathlib import Path

    manifest = Path(root) / "train" / "manifest.csv"
    mtime = manifest.stat().st_mtime_ns
    toy_dm.prepare_data()
    assert manifest.stat().st_mtime_ns == mtime
    assert (Path(root) / "val" / "manifest.csv").is_file()


def test_toy_at_32px(tmp_path):
    dm = VideoTextDataModule(
        toy={"root": str(tmp_path), "videos_per_caption": 1, "val_videos_per_caption": 1},
        height=32,
        width=32,
        num_frames=5,
        batch_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["video"].shape == (4, 5, 32, 32, 3)


# ---------------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("num_frames", [8, 10, 2, 16])
def test_num_frames_must_be_4k_plus_1(tmp_path, num_frames):
    with pytest.raises(ValueError, match="4k\\+1"):
        VideoTextDataModule(toy={"root": str(tmp_path)}, num_frames=num_frames)


def test_valid_num_frames_accepted(tmp_path):
    for num_frames in (1, 5, 9, 13, 17):
        dm = VideoTextDataModule(toy={"root": str(tmp_path)}, num_frames=num_frames)
        assert dm.hparams.num_frames == num_frames


def test_size_must_match_spatial_multiple(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        VideoTextDataModule(toy={"root": str(tmp_path)}, height=20, width=16, spatial_multiple=16)


def test_needs_a_data_source():
    with pytest.raises(ValueError, match="train_manifest"):
        VideoTextDataModule()


# ---------------------------------------------------------------------------------------------------- bad input


def _bad_rows(good):
    return [
        *good,
        {"path": "missing.mp4", "caption": "a red square moving up"},
        {"path": "corrupt.mp4", "caption": "a red square moving up"},
        {"path": "short.mp4", "caption": "a red square moving up"},
        {"path": "good_0.mp4", "caption": ""},
    ]


def test_bad_input_is_skipped_and_counted(bad_input):
    root, good = bad_input
    manifest = _manifest(root, "all.csv", _bad_rows(good))
    # 4 of 10 rows are bad; a first batch holding both decode failures makes it 4 of 6 at worst
    dm = VideoTextDataModule(train_manifest=manifest, batch_size=4, max_skip_fraction=0.7)
    dm.skips.min_seen = 1
    dm.setup("fit")
    assert dm.val_dataloader() == []
    # missing file and empty caption are found at setup
    reasons = {(r.path.rsplit("/", 1)[-1], r.reason) for r in dm.skips.skipped}
    assert ("missing.mp4", "file not found") in reasons
    assert ("good_0.mp4", "empty caption") in reasons
    assert len(dm.train_set) == N_GOOD + 2  # the good ones plus the two only decoding can find out about
    batches = _iterate(dm, dm.train_dataloader())
    captions = [c for b in batches for c in b["caption"]]
    assert sorted(captions) == sorted(g["caption"] for g in good)
    for b in batches:
        assert b["video"].shape[1:] == (9, 16, 16, 3) and b["video"].shape[0] == len(b["caption"])
    skipped = {r.path.rsplit("/", 1)[-1]: r.reason for r in dm.skips.skipped}
    assert set(skipped) == {"missing.mp4", "good_0.mp4", "corrupt.mp4", "short.mp4"}
    assert "corrupt.mp4" in skipped["corrupt.mp4"]
    assert "need 9" in skipped["short.mp4"]
    assert len(dm.skips.skipped) == 4
    assert dm.skips.seen == N_GOOD + 4  # every manifest row counted once
    assert dm.skips.epoch_skipped == 2


def test_same_video_with_another_caption_is_kept(bad_input):
    """An empty caption on one row must not drop other rows that use the same video file."""
    root, good = bad_input
    rows = [*good, {"path": "good_0.mp4", "caption": ""}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "dup.csv", rows), batch_size=4, max_skip_fraction=0.5)
    dm.setup("fit")
    assert len(dm.train_set) == N_GOOD
    assert [r.reason for r in dm.skips.skipped] == ["empty caption"]


def test_missing_file_with_empty_caption_counts_once(bad_input):
    root, good = bad_input
    rows = [*good, {"path": "missing.mp4", "caption": ""}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "both.csv", rows), batch_size=3, max_skip_fraction=0.5)
    dm.setup("fit")
    assert [r.reason for r in dm.skips.skipped] == ["file not found"]
    _iterate(dm, dm.train_dataloader())
    assert dm.skips.seen == N_GOOD + 1  # one manifest row, one count


def test_too_many_missing_files_fail_at_setup(bad_input):
    root, good = bad_input
    rows = [*good, {"path": "missing.mp4", "caption": "x"}, {"path": "gone/too.mp4", "caption": "y"}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "missing.csv", rows), max_skip_fraction=0.1)
    with pytest.raises(ManifestError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "missing.mp4" in msg and "too.mp4" in msg and "file not found" in msg
    assert "2 of 8" in msg
    assert "max_skip_fraction" in msg


def test_missing_files_within_budget_pass_setup(bad_input):
    root, good = bad_input
    rows = [*good, {"path": "missing.mp4", "caption": "x"}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "one_missing.csv", rows), max_skip_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) == N_GOOD


def test_too_many_decode_failures_stop_with_names(bad_input):
    root, good = bad_input
    rows = [*good, {"path": "corrupt.mp4", "caption": "c"}, {"path": "short.mp4", "caption": "s"}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "decode.csv", rows), batch_size=8, max_skip_fraction=0.1)
    dm.skips.min_seen = 4
    dm.setup("fit")  # nothing is missing: the manifest itself is fine
    with pytest.raises(RuntimeError) as info:
        _iterate(dm, dm.train_dataloader())
    msg = str(info.value)
    assert "corrupt.mp4" in msg and "short.mp4" in msg
    assert "2 of 8" in msg and "max_skip_fraction" in msg


def test_decode_failures_below_min_seen_do_not_stop(bad_input):
    root, good = bad_input
    rows = [*good, {"path": "corrupt.mp4", "caption": "c"}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "few.csv", rows), batch_size=7, max_skip_fraction=0.01)
    assert dm.skips.min_seen > 7  # default: judge the fraction only once enough samples were seen
    dm.setup("fit")
    batches = _iterate(dm, dm.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == N_GOOD
    assert [r.path.rsplit("/", 1)[-1] for r in dm.skips.skipped] == ["corrupt.mp4"]


def test_batch_of_only_skipped_items_is_counted_and_logged(bad_input, caplog):
    root, good = bad_input
    rows = [good[0], {"path": "corrupt.mp4", "caption": "c"}]
    manifest = _manifest(root, "one_each.csv", rows)
    dm = VideoTextDataModule(train_manifest=manifest, val_manifest=manifest, batch_size=1, max_skip_fraction=0.5)
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="tmd_lightning.data.dataset"):
        batches = _iterate(dm, dm.val_dataloader())  # unshuffled: the good file, then the corrupt one
    assert [len(b["caption"]) for b in batches] == [1, 0] and batches[1]["video"].shape[0] == 0
    assert dm.skips.empty_batches == 1 and dm.skips.seen == 2
    assert "no usable sample" in caplog.text and "step is skipped" in caplog.text


# ---------------------------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "name, text",
    [
        ("empty.csv", ""),
        ("header_only.csv", "path,caption\n"),
        ("no_caption.csv", "path,text\ngood_0.mp4,hello\n"),
        ("broken.jsonl", '{"path": "good_0.mp4", "caption": "ok"}\n{oops\n'),
        ("frames.csv", "path,caption,num_frames\ngood_0.mp4,ok,nine\n"),
    ],
)
def test_malformed_manifest_fails_at_setup(bad_input, name, text):
    root, _ = bad_input
    (root / name).write_text(text)
    dm = VideoTextDataModule(train_manifest=str(root / name))  # constructing is cheap and lazy
    with pytest.raises(ManifestError):
        dm.setup("fit")


def test_missing_manifest_fails_at_setup(tmp_path):
    dm = VideoTextDataModule(train_manifest=str(tmp_path / "nope.csv"))
    with pytest.raises(ManifestError, match="not found"):
        dm.setup("fit")


def test_malformed_val_manifest_fails_at_setup(bad_input):
    root, good = bad_input
    train = _manifest(root, "train_ok.csv", good)
    (root / "val_bad.csv").write_text("path\ngood_0.mp4\n")
    dm = VideoTextDataModule(train_manifest=train, val_manifest=str(root / "val_bad.csv"))
    with pytest.raises(ManifestError, match="caption"):
        dm.setup("fit")


class _CountingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.steps = 0
        self.captions: list[str] = []

    def training_step(self, batch, batch_idx):
        self.steps += 1
        self.captions.extend(batch["caption"])
        return self.layer(batch["video"].float().mean(dim=(1, 2, 3)) / 255).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_trainer_malformed_manifest_fails_before_training(bad_input, tmp_path):
    root, _ = bad_input
    (root / "trainer_bad.csv").write_text("path,caption\n")
    model = _CountingModule()
    dm = VideoTextDataModule(train_manifest=str(root / "trainer_bad.csv"))
    with pytest.raises(ManifestError):
        _trainer(tmp_path, max_steps=2).fit(model, datamodule=dm)
    assert model.steps == 0


def test_trainer_counts_skips_through_lightning_hook(bad_input, tmp_path):
    root, good = bad_input
    rows = [*good, {"path": "corrupt.mp4", "caption": "c"}, {"path": "short.mp4", "caption": "s"}]
    dm = VideoTextDataModule(train_manifest=_manifest(root, "trainer.csv", rows), batch_size=4, max_skip_fraction=0.5)
    model = _CountingModule()
    _trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    assert model.steps == 2
    assert sorted(model.captions) == sorted(g["caption"] for g in good)
    assert sorted(r.path.rsplit("/", 1)[-1] for r in dm.skips.skipped) == ["corrupt.mp4", "short.mp4"]


def test_trainer_stops_on_too_many_decode_failures(bad_input, tmp_path):
    root, good = bad_input
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    for i in range(3):  # half the files turn corrupt
        (work / f"good_{i}.mp4").write_bytes(b"\x00" * 100)
    dm = VideoTextDataModule(train_manifest=_manifest(work, "m.csv", good), batch_size=3, max_skip_fraction=0.2)
    dm.skips.min_seen = 3
    with pytest.raises(RuntimeError, match="could not be used"):
        _trainer(tmp_path, max_epochs=1).fit(_CountingModule(), datamodule=dm)
