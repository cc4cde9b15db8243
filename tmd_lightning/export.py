"""Entry point: `python -m tmd_lightning.export CHECKPOINT [OUT] [--no-ema]`.

CHECKPOINT is a `.ckpt` file or the distributed checkpoint folder (`last.ckpt/`) of an FSDP2 run (`trainer=fsdp`),
which is consolidated in this one process (no GPUs or process group needed).

Writes the trained network (teacher transformer or TMD student) of a stage checkpoint as a diffusers folder
(`config.json` + safetensors) that `from_pretrained` and `python -m tmd_lightning.sample checkpoint=OUT` load. Uses
the EMA weights stored in the checkpoint when there are any. Runs that finish export by themselves (`export/` in
the run folder); this is for a run that was stopped early, or for any intermediate checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tmd_lightning.config import register_resolvers
from tmd_lightning.models.lora import load_merged_state
from tmd_lightning.models.transformer import load_transformer
from tmd_lightning.stages.loading import network_from_record, read_checkpoint


def _network(ckpt: dict, checkpoint: Path) -> tuple[torch.nn.Module, str]:
    """The checkpoint's network, freshly built, and its state-dict prefix; older teacher checkpoints carry no
    architecture record, so theirs comes from the run's `config.yaml` (next to `checkpoints/`)."""
    meta = ckpt.get("tmd_lightning")
    if meta is not None:
        return network_from_record(meta), meta["network_attr"]
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: export needs the run folder written by tmd_lightning.fit")
    register_resolvers()
    return load_transformer(config=OmegaConf.load(config_path).model.transformer_config), "transformer"


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None, use_ema: bool = True) -> Path:
    """Saves the trained network (EMA weights if present and `use_ema`) of a Lightning checkpoint as a diffusers
    folder: a `WanTransformer3DModel` for the teacher stage, a `TMDTransformer` for the student stages."""
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    network, attr = _network(ckpt, checkpoint)
    prefix = attr + "."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    ema = next((s for name, s in ckpt.get("callbacks", {}).items() if name.startswith("EMA")), None)
    if use_ema and ema is not None:
        state.update(ema["shadow"])
    load_merged_state(network, state, (ckpt.get("tmd_lightning") or {}).get("lora"))  # a LoRA student: merged
    out = Path(out) if out else checkpoint.parent.parent / "export" / f"{attr}_step{ckpt['global_step']}"
    network.save_pretrained(str(out))
    print(f"exported step {ckpt['global_step']} ({'EMA' if use_ema and ema else 'raw'} weights) to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    args = parser.parse_args(argv)
    export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)


if __name__ == "__main__":
    main()
