"""VideoCLIPScore against an independent reference computed with a tiny random CLIP built here (nothing downloaded)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from tmd_lightning.metrics.clip_score import VideoCLIPScore, load_local_clip

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BOS, EOS = 0, 1
MERGES = ("r e", "re d</w>", "c a", "ca t</w>", "d o", "do g</w>")
# With the seed-2 tiny CLIP, "b c d" scores positive and "red" negative on random frames (asserted where it matters).
CAPTIONS = ["b c d", "b c d", "red"]


def _vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merge in MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    return vocab


def build_tiny_clip(path: Path, seed: int = 2) -> Path:
    """A tiny random CLIP (32 px images, 8 px patches, hidden 32) with a hand-written BPE vocabulary."""
    torch.manual_seed(seed)
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {
        **layers,
        "vocab_size": 64,
        "max_position_embeddings": 16,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
    }
    config = CLIPConfig(
        text_config=text, vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    CLIPModel(config).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(_vocab()))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    images = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD)
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _videos(seed: int, b: int = 3, f: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (b, f, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _reference_frame_scores(clip_dir: Path, videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """(B, F) 100 * cos(image, caption) from the bare CLIPModel: hand-built token ids, hand-normalised pixels."""
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    vocab = _vocab()
    b, f = videos.shape[:2]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = (videos.reshape(b * f, 32, 32, 3).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).view(b, f, -1)
        scores = torch.empty(b, f)
        for i, caption in enumerate(captions):
            ids = torch.tensor([[BOS, *(vocab[w + "</w>"] for w in caption.split()), EOS]])
            text = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
            scores[i] = 100 * torch.nn.functional.cosine_similarity(image[i], text.expand_as(image[i]), dim=-1)
    return scores


def test_matches_reference_per_frame_then_per_video(clip_dir: Path) -> None:
    videos = _videos(seed=1)
    frames = _reference_frame_scores(clip_dir, videos, CAPTIONS)
    raw = frames.mean(dim=1)  # unclamped per-video means
    # Preconditions that make the clamp's position observable: a negative video and a positive overall mean.
    assert raw.min() < -1 and raw.mean() > 1, raw
    metric = VideoCLIPScore(clip_dir, frame_batch_size=5)  # chunks that straddle videos
    metric.update(videos, CAPTIONS)
    torch.testing.assert_close(metric.frame_scores(videos, CAPTIONS), frames, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metric.compute(), raw.mean().clamp_min(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metric.compute_per_video(), raw.clamp_min(0), atol=1e-4, rtol=1e-4)


def test_equals_torchmetrics_clipscore_on_all_frames(clip_dir: Path) -> None:
    videos = torch.cat([_videos(seed=2), _videos(seed=3)])
    captions = CAPTIONS + ["b c d", "a red dog", "b c d"]
    ours = VideoCLIPScore(clip_dir)
    ours.update(videos[:3], captions[:3])
    ours.update(videos[3:], captions[3:])  # accumulates across updates
    frames = videos.flatten(0, 1).permute(0, 3, 1, 2)
    theirs = CLIPScore(model_name_or_path=lambda: load_local_clip(clip_dir))
    theirs.update(list(frames), [c for c in captions for _ in range(videos.shape[1])])
    assert theirs.compute() > 1  # not two clamped zeros
    torch.testing.assert_close(ours.compute(), theirs.compute(), atol=1e-4, rtol=1e-4)
    assert ours.compute_per_video().shape == (6,)
    assert int(ours.n_samples) == 6


def test_reset_and_input_checks(clip_dir: Path) -> None:
    metric = VideoCLIPScore(clip_dir)
    metric.update(_videos(seed=4), CAPTIONS)
    metric.reset()
    assert metric.compute_per_video().numel() == 0 and int(metric.n_samples) == 0
    with pytest.raises(ValueError, match="uint8"):
        metric.update(_videos(seed=4).float(), CAPTIONS)
    with pytest.raises(ValueError, match="one caption per video"):
        metric.update(_videos(seed=4), CAPTIONS[:2])


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_clip_here"
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        VideoCLIPScore(missing)
    with pytest.raises(FileNotFoundError, match="CLIP folder"):
        load_local_clip(tmp_path)  # exists, but holds no model
