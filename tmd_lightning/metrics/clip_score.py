"""CLIP score for videos (docs/method.md §8): torchmetrics' ``CLIPScore`` on every frame, averaged per video.

The CLIP model is always loaded from a local folder (a transformers ``CLIPModel`` + ``CLIPProcessor`` snapshot such
as ``openai/clip-vit-large-patch14``), never downloaded: torchmetrics accepts a callable ``model_name_or_path`` that
returns ``(model, processor)``, and :func:`load_local_clip` is that callable.

Definition (what torchmetrics 1.9 computes, see ``torchmetrics/functional/multimodal/clip_score.py``): a frame's
score is ``100 * cos(E_image, E_caption)`` with CLIP's projected embeddings, unclamped; a video's score is the mean
over its frames; the metric reports ``max(mean over videos, 0)``. torchmetrics' docstring writes the clamp per
sample, but its code clamps only the accumulated mean, and this module does the same, so for videos with equal frame
counts :class:`VideoCLIPScore` returns exactly what ``CLIPScore`` returns on all their frames. With a trained CLIP the
cosine between a caption and an image is positive in practice, so the clamp's position does not matter there.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal import CLIPScore
from torchmetrics.utilities import dim_zero_cat


class ClipFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embedding tensor.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` (embedding in ``pooler_output``) where torchmetrics 1.9
    expects a tensor (torchmetrics issue #3407, fixed after 1.9); this adapter accepts either.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings to truncate captions

    @staticmethod
    def _tensor(out: Tensor | object) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings (N, D)."""
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Projected text embeddings (N, D)."""
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_local_clip(path: str | Path) -> tuple[ClipFeatures, object]:
    """Load ``(model, processor)`` from a local CLIP folder, offline; FileNotFoundError when it is not there."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP folder {str(folder)!r} not found or has no config.json: expected a local transformers CLIPModel + "
            "CLIPProcessor snapshot (e.g. of openai/clip-vit-large-patch14); nothing is downloaded"
        )
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    return ClipFeatures(model), processor


def _check_inputs(videos: Tensor, captions: Sequence[str]) -> None:
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos (B, F, H, W, 3), got {tuple(videos.shape)} {videos.dtype}")
    if isinstance(captions, str) or len(captions) != videos.shape[0]:
        raise ValueError(f"expected one caption per video ({videos.shape[0]}), got {captions!r}")


class VideoCLIPScore(CLIPScore):
    """Mean CLIP score of videos against their captions: per frame, averaged per video, then over videos.

    A subclass of torchmetrics' ``CLIPScore`` with a video as the sample: it reuses CLIPScore's model handling,
    its ``score`` / ``n_samples`` sum states (``n_samples`` counts videos) and its ``compute``
    (``max(score / n_samples, 0)``). Per-video scores are kept too (:meth:`compute_per_video`).

    Args:
        clip_path: local CLIP folder (see :func:`load_local_clip`).
        frame_batch_size: frames per CLIP forward, bounding activation memory.
        kwargs: torchmetrics ``Metric`` keyword arguments.
    """

    full_state_update: bool = False
    video_scores: list[Tensor]

    def __init__(self, clip_path: str | Path, frame_batch_size: int = 64, **kwargs: object) -> None:
        super().__init__(model_name_or_path=partial(load_local_clip, clip_path), **kwargs)
        self.frame_batch_size = frame_batch_size
        self.add_state("video_scores", default=[], dist_reduce_fx="cat")

    def frame_scores(self, videos: Tensor, captions: Sequence[str]) -> Tensor:
        """(B, F) unclamped per-frame scores ``100 * cos(E_frame, E_caption)``, torchmetrics' per-sample score."""
        _check_inputs(videos, captions)
        b, f = videos.shape[:2]
        frames = videos.reshape(b * f, *videos.shape[2:]).permute(0, 3, 1, 2)  # (B*F, 3, H, W) uint8
        texts = [caption for caption in captions for _ in range(f)]
        scores = []
        with torch.no_grad():
            for i in range(0, b * f, self.frame_batch_size):
                chunk = slice(i, i + self.frame_batch_size)
                score, _ = _clip_score_update(list(frames[chunk]), texts[chunk], self.model, self.processor)
                scores.append(score.float())
        return torch.cat(scores).view(b, f)

    def update(self, videos: Tensor, captions: Sequence[str]) -> None:  # type: ignore[override]
        """Score uint8 videos (B, F, H, W, 3) against one caption each."""
        per_video = self.frame_scores(videos, captions).mean(dim=1).to(self.score.device)
        self.score += per_video.sum()
        self.n_samples += per_video.numel()
        self.video_scores.append(per_video)

    def compute_per_video(self) -> Tensor:
        """(N,) per-video scores ``max(mean over frames, 0)`` in update order (all ranks' videos under DDP)."""
        with self.sync_context():
            scores = dim_zero_cat(self.video_scores) if len(self.video_scores) else torch.zeros(0)
        return scores.clamp_min(0.0)
