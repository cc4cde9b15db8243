"""The real loading path (docs/method.md §9): `model=wan2.1_t2v_1.3b` on a tiny random folder in the diffusers layout,
both stages through `tmd_lightning.fit` from videos and from a `precompute` cache, the cache without loading UMT5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file
from tiny_wan_folder import TEXT_DIM, Z_DIM, write_tiny_wan_folder, write_toy_videos

import tmd_lightning.precompute as precompute
from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.data import CachedDataModule, get_backend
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.fit import run as fit
from tmd_lightning.models import TextEncoder, WanVAECodec
from tmd_lightning.models.text_encoders import CachedTextEncoder

SIZE = ["data.num_frames=5", "data.height=32", "data.width=32"]
PROMPTS = ["a red circle moving left", "a blue square moving up"]


def _compose(name: str, root: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=[f"paths.root_dir={root}", "model=wan2.1_t2v_1.3b",
                                        f"model.pretrained={root}/wan", "model.head_blocks=1",
                                        "model.disc_blocks=[1,2]", *SIZE, "data.num_workers=0", *overrides])


def _fit(root: Path, experiment: str, data: list[str], run: str, sample: bool) -> dict:
    """A few steps of a stage through the entry point; with `sample`, the real-data callbacks sample (and decode
    with the VAE) the two prompts at the end."""
    stage = ["stage.max_iterations=2", "stage.discriminator.hidden_dim=8"] if experiment == "distill" else []
    evaluate = [f"callbacks.video_eval.prompts={root}/prompts.txt", "callbacks.video_eval.seeds=[0]",
                "callbacks.video_eval.every_n_steps=0"] if sample else ["~callbacks.video_eval"]
    return fit(_compose("fit", root, f"experiment={experiment}", *data, *stage, f"paths.output_dir={root}/{run}",
                        "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2", "callbacks=real",
                        "~callbacks.rich_progress_bar", *evaluate))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real_layout")
    write_tiny_wan_folder(root / "wan")
    write_toy_videos(root / "videos", all_captions()[::6], 32, 5, name="train.csv")  # 8 videos of 5 frames, 32 px
    write_toy_videos(root / "videos", all_captions()[1:5], 32, 5, seed=1, name="val.csv")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def from_videos(world: Path) -> dict[str, dict]:
    data = ["data=manifest", f"data.train_manifest={world}/videos/train.csv",
            f"data.val_manifest={world}/videos/val.csv"]
    return {exp: _fit(world, exp, data, f"videos_{exp}", sample=False) for exp in ("adapt_head", "distill")}


@pytest.fixture(scope="module")
def cache(world: Path) -> tuple[Path, dict]:
    out = world / "cache"
    index = precompute.run(_compose("precompute", world, f"data.train_manifest={world}/videos/train.csv",
                                    f"data.val_manifest={world}/videos/val.csv", f"output={out}",
                                    f"prompts={world}/prompts.txt", f"paths.output_dir={world}/precompute"))["index"]
    return out, index


@pytest.fixture(scope="module")
def from_cache(world: Path, cache, from_videos) -> dict[str, dict]:
    """The same two stages from the cache, with UMT5 unloadable: the cache must not need it."""
    def no_umt5(*args, **kwargs):
        raise AssertionError("UMT5 was loaded in a cached run")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.UMT5EncoderModel, "from_pretrained", no_umt5)
        data = ["data=cache", f"data.cache_dir={cache[0]}"]
        return {exp: _fit(world, exp, data, f"cache_{exp}", sample=True) for exp in ("adapt_head", "distill")}


@pytest.mark.slow
def test_both_stages_run_from_videos_and_from_the_cache(world: Path, from_videos, from_cache) -> None:
    for source, results in (("videos", from_videos), ("cache", from_cache)):
        for exp, result in results.items():
            run = world / f"{source}_{exp}"
            assert Path(result["checkpoint"]).is_file(), (source, exp)
            assert (run / "export" / "student" / "config.json").is_file()
            if source == "cache":  # the two prompts served by the cache, sampled, decoded by the VAE and scored
                curve = (run / "eval_eval.csv").read_text().splitlines()
                assert curve[0].startswith("step,") and "diagnostics/motion" in curve[0] and len(curve) == 2
            losses = [v for k, v in result.items() if k.startswith("train/loss")]
            assert losses and all(torch.isfinite(torch.tensor(losses))), (source, exp)
    # the same seeds on the same clips: the bf16 cache gives the losses of the float32 path
    for exp in ("adapt_head", "distill"):
        for key in [k for k in from_videos[exp] if k.startswith(("train/loss", "val/loss"))]:
            assert from_cache[exp][key] == pytest.approx(from_videos[exp][key], rel=2e-2, abs=1e-3), (exp, key)


def test_cached_latents_are_the_normalised_vae_posterior_mean(world: Path, cache) -> None:
    out, index = cache
    assert index["config"]["dtype"] == "bfloat16" and index["latent_shape"] == [Z_DIM, 2, 4, 4]
    vae_config = json.loads((world / "wan" / "vae" / "config.json").read_text())
    mean = torch.tensor(vae_config["latents_mean"]).view(-1, 1, 1, 1)
    std = torch.tensor(vae_config["latents_std"]).view(-1, 1, 1, 1)
    codec = WanVAECodec.from_pretrained(world / "wan")
    shard = index["splits"]["train"]["shards"][0]
    tensors = load_file(str(out / shard["file"]))
    for j, sample in enumerate(shard["samples"][:2]):
        clip = torch.from_numpy(get_backend("pyav").read(sample["path"], 5))[None]
        x = clip.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        with torch.no_grad():
            z = codec.vae.encode(x).latent_dist.mean[0]  # independent of the codec's own normalisation
        stored = tensors[f"latents.{j}"]
        assert stored.dtype == torch.bfloat16
        torch.testing.assert_close(stored.float(), (z - mean) / std, atol=3e-2, rtol=2e-2)
        assert not torch.allclose(stored.float(), z, atol=0.1)  # the normalisation is not a no-op here


def test_cached_text_is_trimmed_umt5_and_padded_to_512(world: Path, cache) -> None:
    out, index = cache
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(world / "wan" / "tokenizer"), local_files_only=True)
    umt5 = transformers.UMT5EncoderModel.from_pretrained(str(world / "wan" / "text_encoder")).eval()
    dm = CachedDataModule(str(out), 5, 32, 32, text_length=512, batch_size=8)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["text"].shape == (4, 512, TEXT_DIM)
    for caption, text in zip(batch["caption"], batch["text"], strict=True):
        tok = tokenizer(caption, return_tensors="pt")  # no padding: the real tokens only
        n = tok.input_ids.shape[1]
        with torch.no_grad():
            ref = umt5(**tok).last_hidden_state[0]
        torch.testing.assert_close(text[:n], ref, atol=2e-2, rtol=2e-2)  # stored in bf16
        assert torch.count_nonzero(text[n:]) == 0


def test_cache_of_another_text_encoder_width_is_refused(world: Path, cache, tmp_path: Path) -> None:
    other = tmp_path / "wan"
    shutil.copytree(world / "wan" / "text_encoder", other / "text_encoder")
    config = json.loads((other / "text_encoder" / "config.json").read_text())
    (other / "text_encoder" / "config.json").write_text(json.dumps(config | {"d_model": 64}))
    with pytest.raises(ValueError, match="text embeddings of width 32, but the run's text encoder has d_model 64"):
        TextEncoder.from_pretrained(other, cache_dir=cache[0])
    assert isinstance(TextEncoder.from_pretrained(world / "wan", cache_dir=cache[0]), CachedTextEncoder)


def readme_fit_commands() -> list[list[str]]:
    """The overrides of every `tmd_lightning.fit` command in the README's real-scale section (continuation lines
    joined, comments and `...` placeholders dropped)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Real scale"):readme.index("\n## ", readme.index("## Real scale") + 5)]
    commands = []
    for block in section.split("```bash")[1:]:
        text = block.split("```")[0].replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#")[0]
            if "-m tmd_lightning.fit" not in line:
                continue
            tokens = line.split("-m tmd_lightning.fit", 1)[1].split()
            commands.append([t for t in tokens if t != "..." and "=" in t])
    return commands


def _as_tiny(tokens: list[str], world: Path, caches: dict[str, Path]) -> list[str]:
    """A README command on the tiny folder: paths replaced by the test's (the cache made for the command's model),
    one CPU process."""
    model = next((t.split("=", 1)[1] for t in tokens if t.startswith("model=")), "wan2.1_t2v_1.3b")
    cache_dir = caches[model]
    out = []
    for t in tokens:
        key, value = t.split("=", 1)
        if key.startswith(("hydra.", "trainer")) or key == "ckpt_path":
            continue  # one CPU process here; the resume command resumes nothing
        value = {"data.cache_dir": str(cache_dir), "data.train_manifest": f"{world}/videos/train.csv"}.get(key, value)
        out.append(f"{key}={value}")
    if not any(t.startswith(("data=", "data.cache_dir=")) for t in tokens):  # "..." stood for the user's cache
        out.append(f"data.cache_dir={cache_dir}")
    return out


@pytest.fixture(scope="module")
def cache_14b(world: Path) -> Path:
    """The tiny folder's cache as `model=wan2.1_t2v_14b` makes it (a cache records the model it was made for)."""
    out = world / "cache_14b"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("precompute", overrides=[f"paths.root_dir={world}", "model=wan2.1_t2v_14b",
                                               f"model.pretrained={world}/wan", *SIZE, "data.num_workers=0",
                                               f"data.train_manifest={world}/videos/train.csv", f"output={out}",
                                               f"paths.output_dir={world}/precompute_14b"])
    precompute.run(cfg)
    return out


@pytest.mark.slow
def test_every_readme_real_scale_fit_command_passes_its_guards_and_trains_one_step(world: Path, cache, cache_14b,
                                                                                    tmp_path: Path) -> None:
    """Each command as written passes the setup guards (memory plan at 80 GiB per GPU, the README's GPUs); then,
    on the tiny random Wan folder and one CPU process, trains one step (Stage 1 commands first: Stage 2 finds
    their checkpoint through `latest`)."""
    from tmd_lightning.guards import check_config

    commands = readme_fit_commands()
    experiments = {next(t for t in c if t.startswith("experiment=")) for c in commands}
    assert {"experiment=wan_adapt_head", "experiment=wan_distill"} <= experiments and len(commands) >= 8
    for tokens in commands:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("fit", overrides=[f"paths.root_dir={tmp_path}", "gpu_memory_gib=80",
                                            *[t for t in tokens if not t.startswith("hydra.")]])
        check_config(cfg)  # raises with a one-line message when a README command would be refused
    order = sorted(commands, key=lambda c: "experiment=wan_adapt_head" not in c)
    caches = {"wan2.1_t2v_1.3b": cache[0], "wan2.1_t2v_14b": cache_14b}
    for k, tokens in enumerate(order):
        stage = ["stage.max_iterations=1", "stage.discriminator.hidden_dim=8"] if "distill" in str(tokens) else []
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("fit", overrides=[
                *_as_tiny(tokens, world, caches), f"paths.root_dir={tmp_path}", f"model.pretrained={world}/wan",
                "model.head_blocks=1", "model.disc_blocks=[1,2]", *SIZE, "data.num_workers=0",
                f"paths.output_dir={tmp_path}/run{k}", "trainer.accelerator=cpu", "trainer.devices=1",
                "trainer.precision=32-true", "trainer.max_steps=1", "stage.global_batch=2", "data.batch_size=1",
                "~callbacks.video_eval", "~callbacks.rich_progress_bar", *stage])
        result = fit(cfg)
        assert Path(result["checkpoint"]).is_file(), tokens
