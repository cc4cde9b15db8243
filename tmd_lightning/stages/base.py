"""What every stage shares: frozen codec and text encoder (kept out of checkpoints), batch encoding, `generate`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from tmd_lightning.runtime.parallel import configure_parallel, gathered_network, network_class, seed_per_rank
from tmd_lightning.sampling import Sampler

FROZEN_PREFIXES = ("codec.", "text_encoder.")


class VideoStage(L.LightningModule):
    """Base LightningModule: holds the frozen codec + text encoder and turns batches into latents and embeddings.

    The frozen encoders are submodules (so Lightning moves them to the device) but are stripped from every
    checkpoint: they load from their own folders, and UMT5-XXL alone is 11B parameters.

    Data parallelism (`trainer=ddp` / `trainer=fsdp`) is set up in `configure_model` (runtime/parallel.py): the
    FSDP2 units per Wan block, DDP's settings, and activation checkpointing when `activation_checkpointing` is set.
    """

    activation_checkpointing: bool = False  # one checkpoint per Wan block (set by the stages' constructor argument)

    def __init__(self, codec: nn.Module, text_encoder: nn.Module, negative_prompt: str = "") -> None:
        super().__init__()
        self.codec = codec.requires_grad_(False)
        self.text_encoder = text_encoder.requires_grad_(False)
        self.negative_prompt = negative_prompt
        self.strict_loading = False

    def encode_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 videos and captions -> (latents (B, C, T, h, w), text embeddings (B, L, D)); no gradients."""
        with torch.no_grad():
            latents = batch["latents"] if "latents" in batch else self.codec.encode(batch["video"])
            text = batch["text"] if "text" in batch else self.text_encoder(batch["caption"])
        return latents.float(), text.float()

    def skip_empty_batch(self, batch: dict[str, Any]) -> bool:
        """Whether to skip this step: the batch holds no sample (every item was an unusable file, which the
        DataModule has counted). Under data parallelism every rank skips when any rank's batch is empty, so the
        ranks' collectives stay matched."""
        data = batch.get("latents", batch.get("video"))
        empty = data is None or data.shape[0] == 0
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            empty = trainer.strategy.reduce_boolean_decision(empty, all=False)
        return empty

    def skipped_step(self) -> torch.Tensor | None:
        """What `training_step` returns for a skipped step: None, so Lightning takes no optimizer step. Lightning
        refuses None under data parallelism with automatic optimization; there every rank returns a zero loss over
        the trainable parameters instead (zero gradients: the optimizer's momentum and weight decay still apply)."""
        if self._trainer is None or self.trainer.world_size == 1 or not self.automatic_optimization:
            return None
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def negative_embedding(self, batch_size: int) -> torch.Tensor:
        """The negative-prompt embedding (empty caption for the toy, Wan's negative prompt at scale), repeated."""
        return self.text_encoder([self.negative_prompt]).expand(batch_size, -1, -1).float()

    def check_codec(self) -> None:
        """The codec's latents have as many channels as the network takes: a network trained on another codec (the
        toy's frames per latent frame, another VAE) would otherwise train or sample on scrambled inputs."""
        config = getattr(self.network, "config", {})
        channels = config.get("in_channels", (config.get("wan_config") or {}).get("in_channels"))
        codec_channels = getattr(self.codec, "latent_channels", None)
        if channels is not None and codec_channels is not None and channels != codec_channels:
            raise ValueError(f"the codec ({type(self.codec).__name__}) makes {codec_channels}-channel latents but the "
                             f"network takes in_channels={channels}: use the codec it was trained with (the toy: "
                             "model.codec.frames_per_latent=in_channels / 48)")

    def setup(self, stage: str) -> None:
        self.check_codec()
        seed_per_rank(self.trainer)  # data-parallel ranks draw different noise (no-op in a single process)

    def configure_model(self) -> None:
        """Activation checkpointing and the strategy's needs (FSDP2 sharding, DDP checks); see runtime/parallel.py."""
        configure_parallel(self, self.activation_checkpointing)

    def full_precision_modules(self) -> list[nn.Module]:
        """Modules whose weights some call needs in float32 under bf16-mixed: FSDP2 shards them without its bf16
        `MixedPrecisionPolicy` (runtime/parallel.py), so autocast casts them as on one device. None by default."""
        return []

    def train(self, mode: bool = True):  # frozen encoders stay in eval mode
        super().train(mode)
        self.codec.eval()
        self.text_encoder.eval()
        return self

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.codec.latent_shape(num_frames, height, width)

    def initial_noise(self, seeds: list[int], shape: tuple[int, ...], stream: int = 0) -> torch.Tensor:
        """One noise tensor per seed, reproducible regardless of batch composition or device.

        `stream` > 0 gives further independent draws per seed (the TMD sampler's inner noise of each outer step).
        """
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + 1_000_003 * stream))
                 for s in seeds]
        return torch.stack(noise).to(self.device)

    def generate(self, captions: list[str], seeds: list[int], num_frames: int, height: int, width: int,
                 **sampler: Any) -> torch.Tensor:
        """uint8 videos (B, F, H, W, 3) for (caption, seed) pairs; each stage supplies `sample_latents`."""
        latents = self.generate_latents(captions, seeds, num_frames, height, width, **sampler)
        with torch.no_grad():
            return self.codec.decode(latents)

    def generate_latents(self, captions: list[str], seeds: list[int], num_frames: int, height: int, width: int,
                         **sampler: Any) -> torch.Tensor:
        """The latents `generate` decodes (the codec's normalised space, what a cache stores)."""
        self.check_codec()
        noise = self.initial_noise(seeds, self.latent_shape(num_frames, height, width))
        with torch.no_grad():
            text = self.text_encoder(captions)
            return self.sample_latents(noise, text, seeds=seeds, **self.sampler_options(**sampler))

    sampler: Sampler  # how this stage's network is sampled (sampling.py); each stage sets it in __init__

    def sampler_options(self, **sampler: Any) -> dict[str, Any]:
        """The stage's sampler options updated with the non-None `sampler` values; unknown keys are an error."""
        return self.sampler.with_options(**sampler).options()

    def sample_latents(self, noise: torch.Tensor, text: torch.Tensor, seeds: list[int] | None = None,
                       trajectory: list | None = None, **sampler: Any) -> torch.Tensor:
        """The stage's sampler (with `sampler` options) on its network; extra noise comes from the seeds' streams;
        `trajectory` collects the intermediate states (notebooks)."""
        chosen = self.sampler.with_options(**sampler)
        neg = self.negative_embedding(noise.shape[0]) if chosen.uses_cfg() else None
        stream = None if seeds is None else \
            (lambda i: self.initial_noise(seeds, tuple(noise.shape[1:]), stream=i))  # noqa: E731
        return chosen.sample(self.network, noise, text, neg=neg, noise_stream=stream, trajectory=trajectory)

    def sampler_nfe(self, **sampler: Any) -> float:
        return self.sampler.with_options(**sampler).nfe(self.network)

    # -- what every checkpoint says about itself, so `sample` and `export` rebuild the right network -------------
    network_attr: str = "transformer"

    @property
    def network(self) -> nn.Module:
        """The trained network (the teacher's transformer, the student)."""
        return getattr(self, self.network_attr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint["tmd_lightning"] = {"network_attr": self.network_attr, "sampler": self.sampler.to_record(),
                                       "network_class": network_class(self.network).__name__,
                                       "network_config": {k: v for k, v in self.network.config.items()
                                                          if not k.startswith("_")}}

    def configure_optimizers(self) -> dict[str, Any]:
        """`hparams.optimizer` (a partial) over the network's trainable parameters, with an optional per-step
        `hparams.scheduler`."""
        optimizer = self.hparams.optimizer(params=self.parameter_groups())
        if self.hparams.get("scheduler") is None:
            return {"optimizer": optimizer}
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one, the network's trainable parameters (stages override it to give
        some parameters another learning rate)."""
        return [{"params": [p for p in self.network.parameters() if p.requires_grad]}]

    def export_pretrained(self, path: str) -> bool:
        """Saves the network as a diffusers folder (`from_pretrained` loads it) with its sampler's record
        (`sampling.json`); returns whether this process wrote.

        Under FSDP2 every rank must call it: the full weights are gathered to rank 0, which alone writes.
        """
        from tmd_lightning.checkpoints import write_sampling_record  # checkpoints builds stages: imported on use

        network = gathered_network(self.network)
        if network is None:
            return False
        network.save_pretrained(path)
        write_sampling_record(path, self.sampler)
        return True
