"""`python -m tmd_lightning.kd_pairs`: teacher noise -> sample pairs for the one-step DMD2-v's KD warm-up, made by a
tiny random teacher with the toy codec and text encoder. Stored pairs equal the teacher's sampler run directly on the
same noise; reruns write only missing or damaged shards; two ranks write disjoint shares of the same pairs; skip-layer
guidance follows its definition (written out here with a copy of the teacher whose block is replaced by identity).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from tiny_wan_folder import write_tiny_toy_teacher

import tmd_lightning.data.cache_writer as cache_writer
import tmd_lightning.data.teacher_pairs as teacher_pairs
import tmd_lightning.kd_pairs as kd_pairs
from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.data import CachedDataModule, CacheError
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.flow import time_grid
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder
from tmd_lightning.sampling import cfg_velocity, teacher_sample

CAPTIONS = all_captions()[:3]
SEED = 5
STEPS = 3
TOY_GUIDANCE = float(OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml").guidance_scale)  # the pairs' CFG


def _cfg(teacher: Path, output: Path, *overrides: str) -> DictConfig:
    """5 training + 2 validation pairs over 3 prompts, in shards of 2 (batches of 3 cross shard borders)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("kd_pairs", overrides=[
            f"paths.root_dir={teacher.parent}", f"paths.output_dir={teacher.parent}/run", f"teacher={teacher}",
            f"output={output}", f"prompts=[{','.join(CAPTIONS)}]", "num_pairs=5", "num_val_pairs=2", "shard_size=2",
            "batch_size=3", f"sampler.steps={STEPS}", "dtype=float32", f"seed={SEED}", "device=cpu", *overrides])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_toy_teacher(tmp_path_factory.mktemp("kd") / "teacher")


@pytest.fixture(scope="module")
def cache(teacher: Path) -> tuple[Path, dict]:
    out = teacher.parent / "pairs"
    return out, kd_pairs.run(_cfg(teacher, out, "rank=0", "world_size=1"))["index"]


@pytest.fixture(scope="module")
def toy_text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def _stored(out: Path, index: dict, splits: tuple[str, ...] = ("train", "val")
            ) -> list[tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(sample record, teacher sample, text, noise) of every stored pair: training pairs, then validation pairs."""
    rows = []
    for split in splits:
        for shard in index["splits"][split]["shards"]:
            t = load_file(str(out / shard["file"]))
            rows += [(s, t[f"latents.{j}"], t[f"text.{j}"], t[f"noise.{j}"]) for j, s in enumerate(shard["samples"])]
    return rows


def _assert_same_pairs(stored: list[tuple], reference: list[tuple]) -> None:
    """The same records and noise, bit for bit; samples and text to float rounding: a resumed or ranked run batches
    other items together, which moves float sums by an ulp on some CPUs."""
    for (s, z, text, noise), (rs, rz, rtext, rnoise) in zip(stored, reference, strict=True):
        assert s == rs and torch.equal(noise, rnoise)
        torch.testing.assert_close(z, rz, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text, rtext, atol=1e-6, rtol=1e-6)


def _wan_fn(wan: torch.nn.Module):
    return lambda x, t, c: wan(x, timestep=1000.0 * t, encoder_hidden_states=c, return_dict=False)[0]


def test_stored_pairs_are_the_teacher_samplers_output_from_the_stored_noise(cache, teacher, toy_text_encoder):
    out, index = cache
    wan = WanTransformer3DModel.from_pretrained(str(teacher / "transformer"))
    shape = instantiate(OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml").codec).latent_shape(9, 16, 16)
    neg = toy_text_encoder([""])
    stored = _stored(out, index)
    assert [s["pair"] for s, *_ in stored] == list(range(7))  # 5 training pairs, then 2 held out
    assert [len(s["samples"]) for s in index["splits"]["train"]["shards"]] == [2, 2, 1]
    for sample, latents, text, noise in stored:
        i = sample["pair"]
        assert sample["caption"] == CAPTIONS[i % 3]
        eps = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + i))  # seeded by the pair's index
        assert torch.equal(noise, eps)
        cond = toy_text_encoder([sample["caption"]])
        with torch.no_grad():  # the teacher's sampler, called directly: 3 Euler steps, the toy's CFG against ""
            expected = teacher_sample(cfg_velocity(_wan_fn(wan), cond, neg, TOY_GUIDANCE), eps[None], STEPS, 3.0)[0]
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
        assert (latents - noise).abs().mean() > 0.1  # the teacher moved it
        n = text.shape[0]
        torch.testing.assert_close(text, cond[0, :n], atol=1e-6, rtol=1e-6)
        assert n == 6 and torch.count_nonzero(cond[0, n:]) == 0  # trimmed to the caption's tokens
    assert index["prompts"]["captions"] == ["", *CAPTIONS] and index["extra_tensors"] == ["noise"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "prompts.safetensors", "train", "val"]  # no temps


def test_the_cache_datamodule_serves_noise_target_and_text(cache, toy_text_encoder):
    out, index = cache
    dm = CachedDataModule(str(out), 9, 16, 16, text_length=8, batch_size=2)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))  # the two held-out pairs, in order
    (_, z5, _, n5), (s6, z6, _, n6) = _stored(out, index)[5:]
    assert torch.equal(batch["noise"], torch.stack([n5, n6])) and torch.equal(batch["latents"], torch.stack([z5, z6]))
    torch.testing.assert_close(batch["text"][1], toy_text_encoder([s6["caption"]])[0], atol=1e-6, rtol=1e-6)


def test_killed_run_resumes_with_the_missing_shards_only(cache, teacher, monkeypatch):
    out = teacher.parent / "resumed"
    written: list[str] = []
    real_write = cache_writer.write_shard

    def write_then_die(path, *a, **k):
        if written:  # the second shard: a kill halfway through its write leaves a partial temporary file
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        written.append(f"{path.parent.name}/{path.name}")
        real_write(path, *a, **k)

    monkeypatch.setattr(cache_writer, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        kd_pairs.run(_cfg(teacher, out, "rank=0", "world_size=1"))
    assert written == ["train/shard_00000.safetensors"] and not (out / "index.json").exists()

    def record_write(path, *a, **k):
        written.append(f"{path.parent.name}/{path.name}")
        real_write(path, *a, **k)

    written.clear()
    monkeypatch.setattr(cache_writer, "write_shard", record_write)
    index = kd_pairs.run(_cfg(teacher, out, "rank=0", "world_size=1"))["index"]
    assert written == ["train/shard_00001.safetensors", "train/shard_00002.safetensors", "val/shard_00000.safetensors"]
    assert not list(out.rglob("*.tmp"))
    _assert_same_pairs(_stored(out, index), _stored(*cache))

    shard = out / "train" / "shard_00001.safetensors"  # truncated afterwards: redone, and only it
    shard.write_bytes(shard.read_bytes()[:-64])
    written.clear()
    kd_pairs.run(_cfg(teacher, out, "rank=0", "world_size=1"))
    assert written == ["train/shard_00001.safetensors"]

    def forbidden(*a, **k):
        raise AssertionError("a finished cache loads no network")

    written.clear()  # a rerun over the finished cache loads neither the teacher nor the text encoder
    monkeypatch.setattr(teacher_pairs, "load_transformer", forbidden)
    monkeypatch.setattr(teacher_pairs, "instantiate", forbidden)
    assert kd_pairs.run(_cfg(teacher, out, "rank=0", "world_size=1"))["written"] == [] and written == []


def test_two_ranks_write_disjoint_shares_and_the_last_writes_the_index(cache, teacher, monkeypatch):
    out = teacher.parent / "ranked"
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in ("0", "1"):  # as torchrun would start them (here one after the other)
        monkeypatch.setenv("RANK", rank)
        result = kd_pairs.run(_cfg(teacher, out))
        shares.append({f"{p.parent.name}/{p.name}" for p in result["written"]})
        assert (result["index"] is None) == (rank == "0")
    assert shares == [{"train/shard_00000.safetensors", "train/shard_00002.safetensors"},
                      {"train/shard_00001.safetensors", "val/shard_00000.safetensors"}]
    index = result["index"]
    _assert_same_pairs(_stored(out, index), _stored(*cache))


class _Identity(torch.nn.Module):
    """A Wan block that passes its tokens through: the teacher with one block skipped."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def test_skip_layer_guidance_skips_the_block_in_the_unconditional_branch_within_its_window(teacher,
                                                                                          toy_text_encoder):
    out = teacher.parent / "slg"
    index = kd_pairs.run(_cfg(teacher, out, "num_pairs=1", "num_val_pairs=0", "sampler.steps=4", "skip_layers=[1]",
                              "skip_layers_start=0.5", "rank=0", "world_size=1"))["index"]
    ((sample, latents, _, noise),) = _stored(out, index, ("train",))
    wan = WanTransformer3DModel.from_pretrained(str(teacher / "transformer"))
    skipped = copy.deepcopy(wan)
    skipped.blocks[1] = _Identity()
    cond, neg = toy_text_encoder([sample["caption"]]), toy_text_encoder([""])
    x, grid = noise[None], time_grid(4, 3.0, t_max=1.0)
    with torch.no_grad():
        for step, i in enumerate(range(4, 0, -1)):  # steps 0, 1 plain CFG; from half the run on, SLG
            t = torch.full((1,), float(grid[i]))
            v_cond = _wan_fn(wan)(x, t, cond)
            v_neg = _wan_fn(skipped if step >= 2 else wan)(x, t, neg)
            x = x - float(grid[i] - grid[i - 1]) * (v_neg + TOY_GUIDANCE * (v_cond - v_neg))
    torch.testing.assert_close(latents, x[0], atol=1e-5, rtol=1e-5)
    plain = _stored(*_plain(teacher), ("train",))[0][1]
    assert (latents - plain).abs().max() > 1e-3  # the skipped block changes the sample


def _plain(teacher: Path) -> tuple[Path, dict]:
    out = teacher.parent / "plain4"
    return out, kd_pairs.run(_cfg(teacher, out, "num_pairs=1", "num_val_pairs=0", "sampler.steps=4", "rank=0",
                                  "world_size=1"))["index"]


def test_a_bf16_teacher_makes_pairs_close_to_the_float32_ones(cache, teacher):
    out, index = cache
    bf16 = kd_pairs.run(_cfg(teacher, teacher.parent / "bf16", "num_pairs=2", "num_val_pairs=0",
                             "teacher_dtype=bfloat16", "rank=0", "world_size=1"))["index"]
    assert bf16["config"]["teacher_dtype"] == "bfloat16" and index["config"]["teacher_dtype"] == "float32"  # cpu: auto
    pairs16, pairs32 = _stored(teacher.parent / "bf16", bf16, ("train",)), _stored(out, index)[:2]
    for (_, z16, _, n16), (_, z32, _, n32) in zip(pairs16, pairs32, strict=True):
        assert torch.equal(n16, n32) and not torch.equal(z16, z32)  # same noise, the teacher ran in bf16
        assert (z16 - z32).norm() < 0.05 * z32.norm()  # measured: 0.9 % relative error


def test_bad_settings_are_clear_errors(cache, teacher):
    out, _ = cache
    with pytest.raises(ValueError, match=r"skip_layers \[7\]: the teacher has blocks 0 .. 1"):
        kd_pairs.run(_cfg(teacher, teacher.parent / "bad1", "skip_layers=[7]", "rank=0", "world_size=1"))
    with pytest.raises(ValueError, match="needs sampler.cfg != 1"):
        kd_pairs.run(_cfg(teacher, teacher.parent / "bad2", "skip_layers=[1]", "sampler.cfg=1.0", "rank=0",
                          "world_size=1"))
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        kd_pairs.run(_cfg(teacher, teacher.parent / "bad3", "rank=2", "world_size=2"))
    with pytest.raises(ValueError, match="num_pairs must be >= 1"):
        kd_pairs.run(_cfg(teacher, teacher.parent / "bad4", "num_pairs=0", "rank=0", "world_size=1"))
    with pytest.raises(CacheError, match=rf'another configuration:\n  sampler: cache has .*"cfg": {TOY_GUIDANCE}.*'
                                         r'run has .*"cfg": 3.0'):
        kd_pairs.run(_cfg(teacher, out, "sampler.cfg=3.0", "rank=0", "world_size=1"))
