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

from tmd_lightning.checkpoints import export_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    args = parser.parse_args(argv)
    export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)


if __name__ == "__main__":
    main()
