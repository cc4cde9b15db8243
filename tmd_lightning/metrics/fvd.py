"""Fréchet Video Distance in the StyleGAN-V protocol (docs/method.md §8), as a torchmetrics ``Metric``.

The protocol (Skorokhodov et al., StyleGAN-V, ``src/metrics/frechet_video_distance.py``): features come from the
TorchScript port of the tf.hub Kinetics-400 I3D (``i3d_torchscript.pt``) called with ``return_features=True`` (the
400-d pre-softmax output), on 16-frame clips of RGB videos laid out (B, 3, T, H, W), resized to 224x224 and scaled
from [0, 255] to [-1, 1] (the preprocessing of the original TF FVD); the Fréchet distance of the two Gaussians is
taken in float64. StyleGAN-V lets the detector do the resize and rescale (``rescale=True, resize=True`` on uint8
input); here both are done explicitly (:func:`preprocess_i3d`) and the detector is called with ``rescale=False,
resize=False``, so the exact input the network sees is visible and testable (the convention of StyleGAN-V's
companion ``fvd-comparison`` check against the TF FVD). The two paths agree to float32 round-off if the detector's
internal resize is the same half-pixel bilinear resize (not verifiable without the file);
``I3DFeatures(detector_preprocess=True)`` makes the literal StyleGAN-V call instead.

The feature extractor is pluggable: any callable mapping uint8 videos (B, F, H, W, 3) to features (B, d) with a
``num_features`` attribute (:class:`I3DFeatures`). The metric keeps only float64 sums, so its states sum across ranks
like torchmetrics' FID, and the extractor is never registered as a submodule: metric networks live in callbacks, not
in a LightningModule's state dict. With ``reset_real_features=False`` (torchmetrics' FID option of the same name) the
real side survives :meth:`~FrechetVideoDistance.reset`: the reference videos are read and embedded once, and every
later evaluation adds only its generated videos.

FVDs computed from different sample counts are not comparable (the protocol uses 2048 real and 2048 generated
clips); :attr:`FrechetVideoDistance.num_real` / :attr:`~FrechetVideoDistance.num_fake` give the counts to report.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from tmd_lightning.metrics.frechet import frechet_distance

I3D_FILENAME = "i3d_torchscript.pt"
I3D_NUM_FRAMES = 16
I3D_RESOLUTION = 224
I3D_NUM_FEATURES = 400
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


@runtime_checkable
class VideoFeatureExtractor(Protocol):
    """Maps uint8 videos (B, F, H, W, 3) to features (B, num_features)."""

    num_features: int

    def __call__(self, videos: Tensor) -> Tensor: ...


def _check_videos(videos: Tensor) -> None:
    """Raises on anything but a uint8 (B, F, H, W, 3) batch."""
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected videos of shape (B, F, H, W, 3), got {tuple(videos.shape)}")
    if videos.dtype != torch.uint8:
        raise TypeError(f"expected uint8 videos in [0, 255], got {videos.dtype}")


def clip_videos(videos: Tensor, num_frames: int = I3D_NUM_FRAMES) -> Tensor:
    """The protocol's clip of each (B, F, H, W, 3) uint8 video: its first ``num_frames`` frames."""
    _check_videos(videos)
    if videos.shape[1] < num_frames:
        raise ValueError(
            f"FVD (StyleGAN-V protocol) needs clips of {num_frames} frames, got videos with {videos.shape[1]} frames"
        )
    return videos[:, :num_frames]


def preprocess_i3d(videos: Tensor, num_frames: int = I3D_NUM_FRAMES, resolution: int = I3D_RESOLUTION) -> Tensor:
    """uint8 videos (B, F, H, W, 3) -> float32 (B, 3, num_frames, resolution, resolution) in [-1, 1].

    First ``num_frames`` frames; each frame resized to ``resolution`` x ``resolution`` (bilinear, half-pixel centres,
    no antialiasing, aspect ratio not kept, as in the TF FVD's ``resize_bilinear``); values mapped by ``2x/255 - 1``.
    """
    clip = clip_videos(videos, num_frames)
    b, t, h, w, c = clip.shape
    frames = clip.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float()  # (B*T, 3, H, W)
    if (h, w) != (resolution, resolution):
        frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False)
    frames = frames / 127.5 - 1.0
    return frames.reshape(b, t, c, resolution, resolution).permute(0, 2, 1, 3, 4).contiguous()


def load_i3d_detector(path: str | Path, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Loads the StyleGAN-V I3D TorchScript detector from a local file (or a folder holding ``i3d_torchscript.pt``).

    Nothing is downloaded: a missing file raises ``FileNotFoundError`` saying where to put it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / I3D_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D detector not found at '{path}'. FVD (StyleGAN-V protocol) needs the TorchScript I3D "
            f"'{I3D_FILENAME}' released with StyleGAN-V; put that file at this path (or pass the path/folder that "
            f"holds it). Nothing is downloaded."
        )
    return torch.jit.load(str(path), map_location=map_location).eval()


class I3DFeatures(nn.Module):
    """Frozen StyleGAN-V I3D: uint8 videos (B, F, H, W, 3) -> (B, 400) features (pre-softmax Kinetics-400 output).

    Args:
        path: ``i3d_torchscript.pt`` or the folder holding it.
        num_features: the detector's feature size (400 for the StyleGAN-V file).
        batch_size: clips per detector call, bounding activation memory.
        detector_preprocess: pass the uint8 (B, 3, 16, H, W) clip with ``rescale=True, resize=True`` (the literal
            StyleGAN-V call) instead of :func:`preprocess_i3d` with ``rescale=False, resize=False``.
    """

    def __init__(
        self,
        path: str | Path,
        num_features: int = I3D_NUM_FEATURES,
        batch_size: int = 16,
        detector_preprocess: bool = False,
    ) -> None:
        super().__init__()
        self.detector = load_i3d_detector(path)
        for p in self.detector.parameters():  # ScriptModules have no requires_grad_
            p.requires_grad_(False)
        self.num_features = num_features
        self.batch_size = batch_size
        self.detector_preprocess = detector_preprocess
        self.train(False)

    def train(self, mode: bool = True) -> I3DFeatures:
        """Always stays in eval mode: the detector is a fixed measuring instrument."""
        return super().train(False)

    def _device(self, fallback: torch.device) -> torch.device:
        tensor = next(iter([*self.detector.parameters(), *self.detector.buffers()]), None)
        return fallback if tensor is None else tensor.device

    def _embed(self, videos: Tensor) -> Tensor:
        device = self._device(videos.device)
        if self.detector_preprocess:
            clip = clip_videos(videos).permute(0, 4, 1, 2, 3).contiguous()  # uint8 (B, 3, T, H, W)
            return self.detector(clip.to(device), rescale=True, resize=True, return_features=True)
        x = preprocess_i3d(videos.to(device))
        return self.detector(x, rescale=False, resize=False, return_features=True)

    @torch.no_grad()
    def forward(self, videos: Tensor) -> Tensor:
        _check_videos(videos)
        clip_videos(videos)  # fail on short videos before any detector call
        return torch.cat([self._embed(chunk) for chunk in videos.split(self.batch_size)]).float()


class FrechetVideoDistance(Metric):
    """FVD between real and generated videos from any :class:`VideoFeatureExtractor`.

    States are float64 feature sums, outer-product sums and counts per side, all summed across ranks; ``compute``
    forms mean and unbiased (n - 1) covariance in float64 and returns :func:`frechet_distance`.

    Args:
        feature_extractor: callable uint8 (B, F, H, W, 3) -> (B, d); kept outside the module tree (not a submodule),
            so its weights never enter a parent's ``state_dict`` and ``.to()`` does not move it.
        num_features: d; defaults to ``feature_extractor.num_features``.
        reset_real_features: whether :meth:`reset` also clears the real side (torchmetrics' FID option of the same
            name). ``False`` for a fixed reference: the real videos are embedded once and each round's ``reset`` clears
            only the generated side.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        feature_extractor: VideoFeatureExtractor | Callable[[Tensor], Tensor],
        num_features: int | None = None,
        reset_real_features: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(reset_real_features, bool):
            raise ValueError(f"reset_real_features must be a bool, got {reset_real_features!r}")
        self.reset_real_features = reset_real_features
        num_features = num_features if num_features is not None else getattr(feature_extractor, "num_features", None)
        if num_features is None:
            raise ValueError("pass num_features or give the feature extractor a num_features attribute")
        self.__dict__["feature_extractor"] = feature_extractor  # bypasses nn.Module registration on purpose
        self.num_features = int(num_features)
        d = self.num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_features_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_features_cov_sum", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_features_num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: Tensor, real: bool) -> None:
        """Adds the features of a uint8 (B, F, H, W, 3) batch to the real or the generated side."""
        with torch.no_grad():
            features = self.feature_extractor(videos)
        if features.ndim != 2 or features.shape != (videos.shape[0], self.num_features):
            raise ValueError(
                f"feature extractor returned {tuple(features.shape)}, expected ({videos.shape[0]}, {self.num_features})"
            )
        f = features.detach().to(device=self.real_features_sum.device, dtype=torch.float64)
        side = "real" if real else "fake"
        setattr(self, f"{side}_features_sum", getattr(self, f"{side}_features_sum") + f.sum(dim=0))
        setattr(self, f"{side}_features_cov_sum", getattr(self, f"{side}_features_cov_sum") + f.T @ f)
        setattr(self, f"{side}_features_num_samples", getattr(self, f"{side}_features_num_samples") + f.shape[0])

    @property
    def num_real(self) -> int:
        """Real samples accumulated so far (on this rank until synced)."""
        return int(self.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        """Generated samples accumulated so far (on this rank until synced)."""
        return int(self.fake_features_num_samples)

    def _gaussian(self, side: str) -> tuple[Tensor, Tensor]:
        n = int(getattr(self, f"{side}_features_num_samples"))
        if n < 2:
            raise RuntimeError(f"FVD needs at least 2 {side} samples for a covariance, got {n}")
        mean = getattr(self, f"{side}_features_sum") / n
        cov = (getattr(self, f"{side}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def reset(self) -> None:
        """Clears the generated side, and the real side too unless ``reset_real_features`` is False (then the real
        states are carried over, as torchmetrics' FID does)."""
        if self.reset_real_features:
            super().reset()
            return
        kept = {name: deepcopy(getattr(self, name)) for name in REAL_STATES}
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)

    def compute(self) -> Tensor:
        """Float64 Fréchet distance between the real and generated feature Gaussians."""
        return frechet_distance(*self._gaussian("real"), *self._gaussian("fake"))
