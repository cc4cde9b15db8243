# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect samples
#
# Looks at what a checkpoint generates (docs/method.md §8): the videos for a few prompts and seeds, the intermediate
# states of its sampler (the TMD student's outer transition steps and the inner flow-head steps inside each,
# Algorithm 1, docs/method.md §3), and a side-by-side comparison with the teacher's 50 × 2 Euler CFG-5 sampler,
# with the effective NFE (docs/method.md §2) and the seconds per video of each.
#
# Set `CHECKPOINT` below to any of:
# - an exported folder (`logs/<experiment>/latest/export/student`, or a teacher's diffusers folder),
# - a stage's Lightning checkpoint (`.ckpt`): teacher, `adapt_head` or `distill`.
#
# By default it takes the latest `distill` export, else the latest `adapt_head` export, else the shipped toy
# teacher, so the notebook runs top to bottom on a fresh clone (about 20 s on two idle CPU cores; under two minutes
# on a busy machine).

# %%
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "tmd_lightning").is_dir()), Path.cwd())
if importlib.util.find_spec("tmd_lightning") is None:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from local folders; nothing downloads

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from IPython.display import HTML  # noqa: E402
from matplotlib.animation import FuncAnimation  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from tmd_lightning.checkpoints import load_checkpoint_stage, load_pretrained_stage  # noqa: E402
from tmd_lightning.config import CONFIG_DIR  # noqa: E402
from tmd_lightning.data.toy_world import FPS, parse_caption  # noqa: E402
from tmd_lightning.metrics.toy import ToyAccuracy  # noqa: E402
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder  # noqa: E402
from tmd_lightning.sampling import FewStepSampler, TeacherSampler, TMDSampler  # noqa: E402
from tmd_lightning.stages.base import VideoStage  # noqa: E402

# %% [markdown]
# ## Settings

# %%
CANDIDATES = [ROOT / "logs/distill/latest/export/student", ROOT / "logs/adapt_head/latest/export/student"]
CHECKPOINT = next((p for p in CANDIDATES if p.exists()), TOY_MODEL_DIR)  # or a path to a `.ckpt`
TEACHER = TOY_MODEL_DIR  # the reference: a diffusers folder of the teacher the checkpoint was distilled from
PROMPTS = ["a red square moving left", "a green circle moving up", "a blue triangle moving right"]
SEEDS = [0, 1]
NUM_FRAMES, HEIGHT, WIDTH = 9, 16, 16  # the toy world's video size
SAMPLER: dict = {}  # the loaded model's sampler options (e.g. M=1, N=4 for a TMD student); {} = its defaults
TEACHER_SAMPLER = dict(steps=50, cfg=5.0, gamma=3.0, solver="euler")  # 50 x 2 Euler with CFG 5
UPSCALE = 8  # nearest-neighbour upscaling of the 16 px toy frames for display
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %% [markdown]
# ## Load the checkpoint
#
# The toy world's frozen parts are the pixel codec and the tiny T5 text encoder shipped with the teacher; a
# `.ckpt` never contains them (they load from their own folders).

# %%
codec = instantiate(OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml").codec)  # the toy codec: K = 2 frames per token
text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def load_stage(source: str | Path) -> VideoStage:
    """A sampling-ready stage from a Lightning checkpoint or a diffusers folder, in eval mode on DEVICE."""
    if str(source).endswith(".ckpt"):
        stage = load_checkpoint_stage(source, codec, text_encoder)
    else:
        stage = load_pretrained_stage(source, codec, text_encoder)
    return stage.to(DEVICE).eval()


stage = load_stage(CHECKPOINT)
same_as_teacher = Path(CHECKPOINT).resolve() == Path(TEACHER).resolve()
# No student found: the teacher is compared with itself at 4 Euler steps, so the comparison says something.
options = stage.sampler_options(**(SAMPLER or (dict(steps=4) if same_as_teacher else {})))


def model_name(stage: VideoStage, options: dict) -> str:
    """A short name with the sampler's step counts, in the paper's notation (TMD `N2H5`, M given separately)."""
    sampler = stage.sampler.with_options(**options)
    if isinstance(sampler, TMDSampler):
        return f"TMD N{sampler.N}H{stage.network.head_blocks} M{sampler.M}"
    if isinstance(sampler, FewStepSampler):
        return f"DMD2-v M{sampler.M}"
    if isinstance(sampler, TeacherSampler):
        cfg = f" CFG {sampler.cfg:g}" if sampler.cfg != 1.0 else ""
        return f"teacher {sampler.steps} steps{cfg}"
    return sampler.label()


print(f"checkpoint: {Path(CHECKPOINT).resolve()}")
print(f"sampler: {type(stage.sampler).__name__} ({model_name(stage, options)})   sampler: {options}   "
      f"effective NFE: {stage.sampler_nfe(**options):g}")
if isinstance(stage.sampler, TMDSampler):
    print(f"student: L = {stage.network.num_layers} blocks, H = {stage.network.head_blocks} flow-head blocks")

# %% [markdown]
# ## Display helpers
#
# Videos are `(F, H, W, 3)` uint8 tensors. A grid pads the cells with a white line, upscales by `UPSCALE` with
# nearest neighbour (no interpolation blurs the 16 px toy frames), and plays as a JavaScript animation (frames
# embedded as PNGs: no ffmpeg needed).

# %%
def video_grid(cells: list[list[torch.Tensor]], upscale: int = UPSCALE, pad: int = 1) -> np.ndarray:
    """Rows x columns of (F, H, W, 3) uint8 videos -> one (F, rows*h', cols*w', 3) uint8 array."""
    rows = []
    for row in cells:
        tiles = []
        for video in row:
            v = video.cpu().numpy().repeat(upscale, axis=1).repeat(upscale, axis=2)
            tiles.append(np.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=255))
        rows.append(np.concatenate(tiles, axis=2))
    return np.concatenate(rows, axis=1)


DPI = 80  # one image pixel per screen pixel


def labelled_axes(image_hw: tuple[int, int], row_labels: list[str], col_labels: list[str], title: str = "",
                  fontsize: float = 9) -> tuple[plt.Figure, plt.Axes]:
    """A figure holding an (h, w) image at 1:1 scale, with margins sized to fit the row labels on the left and the
    column labels and title on top (tight_layout cannot be used for animations, and crops long labels)."""
    h, w = image_hw
    char_in, line_in = 0.6 * fontsize / 72, 1.4 * fontsize / 72
    left = max(len(label) for label in row_labels) * char_in + 0.25
    top = (title.count("\n") + 1 + max(label.count("\n") + 1 for label in col_labels)) * line_in + 0.2
    width, height = w / DPI + left + 0.15, h / DPI + top + 0.15
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((left / width, 0.15 / height, w / DPI / width, h / DPI / height))
    ax.set_yticks([h / len(row_labels) * (k + 0.5) for k in range(len(row_labels))], row_labels, fontsize=fontsize)
    ax.set_xticks([w / len(col_labels) * (k + 0.5) for k in range(len(col_labels))], col_labels,
                  fontsize=fontsize - 1)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=fontsize + 1)
    return fig, ax


def animate(cells: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
            title: str = "") -> HTML:
    """An animated, labelled grid of videos as HTML (matplotlib's JavaScript player)."""
    grid = video_grid(cells)
    fig, ax = labelled_axes(grid.shape[1:3], row_labels, col_labels, title)
    image = ax.imshow(grid[0], interpolation="nearest")

    def update(frame: int) -> list:
        image.set_data(grid[frame])
        return [image]

    anim = FuncAnimation(fig, update, frames=grid.shape[0], interval=1000 / FPS, blit=True)
    html = HTML(anim.to_jshtml(fps=FPS, default_mode="loop"))
    plt.close(fig)  # the animation is the output, not the figure's first frame
    return html


def frame_strips(videos: list[torch.Tensor], labels: list[str], title: str = "") -> None:
    """A static grid: one row per video, one column per frame."""
    cells = [[v[f : f + 1] for f in range(v.shape[0])] for v in videos]
    grid = video_grid(cells, upscale=max(UPSCALE // 2, 1))[0]
    fig, ax = labelled_axes(grid.shape[:2], labels, [f"frame {f}" for f in range(videos[0].shape[0])], title)
    ax.imshow(grid, interpolation="nearest")
    plt.show()


# %% [markdown]
# ## Samples
#
# Every (prompt, seed) pair in one batch; the noise of each video (and a TMD student's inner noise) depends only
# on its seed, so the same pair gives the same video in any batch.

# %%
pairs = [(p, s) for p in PROMPTS for s in SEEDS]
warmed_up = False


def sample(stage: VideoStage, options: dict) -> tuple[torch.Tensor, float]:
    """(uint8 videos (B, F, H, W, 3) for all `pairs`, seconds per video).

    The first call samples one untimed video first: the first calls of a process pay one-off costs (kernel
    selection, allocator growth) that would otherwise be charged to whichever model is timed first.
    """
    global warmed_up
    if not warmed_up:
        stage.generate([pairs[0][0]], [pairs[0][1]], NUM_FRAMES, HEIGHT, WIDTH, **options)
        warmed_up = True
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    videos = stage.generate([p for p, _ in pairs], [s for _, s in pairs], NUM_FRAMES, HEIGHT, WIDTH, **options)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return videos.cpu(), (time.perf_counter() - start) / len(pairs)


videos, seconds = sample(stage, options)
print(f"{len(pairs)} videos, {seconds:.4f} s per video ({DEVICE}), effective NFE {stage.sampler_nfe(**options):g}")
cells = [[videos[i * len(SEEDS) + j] for j in range(len(SEEDS))] for i in range(len(PROMPTS))]
animate(cells, PROMPTS, [f"seed {s}" for s in SEEDS], title=model_name(stage, options))

# %% [markdown]
# ## Intermediate states, for the first prompt and seed
#
# - **TMD student**: per outer step i (from t_i to t_{i-1}) the backbone runs once, then the flow head rolls the
#   inner sample y from fresh noise y1 (s = 1) down the inner grid to ŷ ≈ ε − x (s = 0). y lives in velocity
#   space, so each inner state is shown as the clean-video estimate it implies, x̂₀ = x_{t_i} − t_i · y; the
#   last row of each outer step is the new state x_{t_{i-1}} = x_{t_i} − (t_i − t_{i-1}) ŷ.
# - **Teacher**: the Euler states x_t (a few of the steps when there are many), with CFG (Euler even when the
#   teacher's sampler is set to UniPC).
# - **DMD2-v student**: the states of its deterministic few-step sampler.
#
# The noise is the same as in the samples above, so the last state is the video shown there.

# %%
def intermediate_states(stage: VideoStage, prompt: str, seed: int, options: dict,
                        max_rows: int = 8) -> tuple[list[torch.Tensor], list[str]]:
    """(latents, labels) of the sampler's intermediate states for one (prompt, seed), the final state last."""
    noise = stage.initial_noise([seed], stage.latent_shape(NUM_FRAMES, HEIGHT, WIDTH))
    trajectory: list = []
    if isinstance(stage.sampler, TeacherSampler):
        options = options | {"solver": "euler"}  # intermediate states of the Euler solver
    with torch.no_grad():
        text = stage.text_encoder([prompt]).float()
        stage.sample_latents(noise, text, seeds=[seed], trajectory=trajectory, **options)

    latents, labels = [noise.cpu()], ["noise"]
    if isinstance(stage.sampler, TMDSampler):
        x = noise.cpu()
        outer = [step["t"] for step in trajectory] + [0.0]
        for k, step in enumerate(trajectory):
            t, t_next, n = outer[k], outer[k + 1], len(step["inner"])
            for j, y in enumerate(step["inner"]):
                latents.append(x - t * y)
                labels.append(f"outer t={t:.3f}  inner {j + 1}/{n}: x̂₀")
            x = step["x"]
            latents.append(x)
            labels.append(f"outer t={t:.3f} -> x at t={t_next:.3f}")
        return latents, labels
    keep = np.unique(np.linspace(0, len(trajectory) - 1, min(max_rows, len(trajectory))).round().astype(int))
    times = [step["t"] for step in trajectory]
    for k in keep:
        t_next = times[k + 1] if k + 1 < len(times) else 0.0
        latents.append(trajectory[k]["x"])
        labels.append(f"step {k + 1}/{len(trajectory)} -> x at t={t_next:.3f}")
    return latents, labels


latents, labels = intermediate_states(stage, PROMPTS[0], SEEDS[0], options)
states = [stage.codec.decode(z.to(DEVICE))[0].cpu() for z in latents]
diff = (states[-1].int() - videos[0].int()).abs().max().item()
print(f"final state vs the sample above: max |difference| = {diff} (of 255; batch composition may shift rounding)")
frame_strips(states, labels, title=f"{model_name(stage, options)}: '{PROMPTS[0]}', seed {SEEDS[0]}")

# %% [markdown]
# ## Against the teacher
#
# The teacher's 50 × 2 Euler CFG-5 sampler and the loaded model on the same prompts and seeds (the same initial
# noise), with the effective NFE (DiT blocks executed ÷ L; CFG doubles it) and the wall-clock seconds per video
# of this batch on this device. For toy prompts, the analytic toy accuracy (colour, shape, direction) too —
# on this handful of videos it is a sanity check, not a measurement.

# %%
teacher = stage if same_as_teacher else load_stage(TEACHER)
teacher_options = teacher.sampler_options(**TEACHER_SAMPLER)
teacher_videos, teacher_seconds = sample(teacher, teacher_options)

try:
    for p in PROMPTS:
        parse_caption(p)
    toy_prompts = True
except ValueError:
    toy_prompts = False


def toy_accuracy(videos: torch.Tensor) -> str:
    """Joint toy accuracy over `pairs`, or '-' for prompts outside the toy world."""
    if not toy_prompts:
        return "-"
    metric = ToyAccuracy()
    metric.update(videos, [p for p, _ in pairs])
    return f"{float(metric.compute()['joint']):.2f}"


rows = [(model_name(teacher, teacher_options), teacher_options, teacher.sampler_nfe(**teacher_options),
         teacher_seconds, toy_accuracy(teacher_videos)),
        (model_name(stage, options), options, stage.sampler_nfe(**options), seconds, toy_accuracy(videos))]
print(f"{'model':<26} {'effective NFE':>13} {'s / video':>10} {'toy acc':>8}   sampler")
for name, opts, nfe, secs, acc in rows:
    print(f"{name:<26} {nfe:>13.3g} {secs:>10.4f} {acc:>8}   {opts}")
print(f"speed-up: {teacher_seconds / seconds:.1f}x wall-clock, "
      f"{teacher.sampler_nfe(**teacher_options) / stage.sampler_nfe(**options):.1f}x effective NFE")

side_by_side = [[teacher_videos[i], videos[i]] for i in range(len(pairs))]
animate(side_by_side, [f"{p} / seed {s}" for p, s in pairs],
        [f"{name}\n(NFE {nfe:.3g})" for name, _, nfe, _, _ in rows], title="teacher vs loaded model")
