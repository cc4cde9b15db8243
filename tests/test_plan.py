"""`python -m tmd_lightning.plan`: counts against real networks and hand formulas, bytes against real allocations.

Independent references: parameter counts of the real toy networks (loaded from the shipped teacher) and a hand-written
Wan parameter formula at real scale; peft's own LoRA injection; the tensors torch actually allocates for an AdamW
step; the tensors autograd actually saves in a Wan block (exactly) and keeps for a Stage-1 forward; the measured
peak of a no-grad forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from peft import LoraConfig

from tmd_lightning import plan as P
from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.models import TOY_MODEL_DIR, Discriminator, TextEncoder, build_student, load_transformer
from tmd_lightning.models.wan_parts import embed

MIXED = ["fp32", "bf16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy's tiny ops run fastest on one thread (and do not spin against a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("plan", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                          *overrides])


@pytest.fixture(scope="module")
def toy_nets():
    """The shipped toy teacher and a Stage-1 student built from it (copied by tests that change them)."""
    return load_transformer(pretrained=TOY_MODEL_DIR), build_student(teacher=str(TOY_MODEL_DIR), head_blocks=1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy plan (32-true on one device, as the toy trains on CPU; narrow discriminator heads keep the real
    optimizer step of the AdamW test fast) and its sizes and counts."""
    cfg = _cfg(tmp_path_factory.mktemp("plan"), "model=toy", "trainer.precision=32-true", "discriminator_hidden_dim=16")
    networks = P.build_networks(cfg)
    return cfg, P.sizes(cfg, networks["codec"], P.wan_architecture(cfg.model)), P.count_all(networks, cfg.lora)


def _autocast(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


# -- parameter counts -------------------------------------------------------------------------------------------
def test_counts_equal_the_real_toy_networks(toy, toy_nets) -> None:
    cfg, _, counts = toy
    teacher, student = toy_nets
    assert (student.head_blocks, student.config.fusion) == (cfg.tmd.H, cfg.tmd.fusion)
    disc = Discriminator(teacher.config.num_attention_heads * teacher.config.attention_head_dim,
                         tuple(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim))
    text = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    for name, real in [("teacher", teacher), ("student", student), ("discriminator", disc),
                       ("text_encoder", text.encoder)]:
        assert counts[name].params == sum(p.numel() for p in real.parameters()), name
        assert counts[name].tensors == len(list(real.parameters())), name
    assert counts["codec"].params == 0  # the toy's pixel codec has no weights


def _wan_params(heads: int, ffn: int, layers: int, head_dim: int = 128, text_dim: int = 4096, freq: int = 256,
                channels: int = 16, patch: int = 4) -> int:
    """WanTransformer3DModel's parameters written out by hand from its layer list (biases included)."""
    d = heads * head_dim
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, out + RMS norms of q and k
    block = 2 * attention + (d * ffn + ffn + ffn * d + d) + 2 * d + 6 * d  # + affine norm2 + scale_shift_table
    embeddings = (channels * patch * d + d) + (text_dim * d + d + d * d + d) + (freq * d + d + d * d + d) \
        + (d * 6 * d + 6 * d)
    return embeddings + layers * block + 2 * d + (d * channels * patch + channels * patch)


@pytest.mark.parametrize("model,heads,ffn,layers,billions", [("wan2.1_t2v_1.3b", 12, 8960, 30, 1.42),
                                                              ("wan2.1_t2v_14b", 40, 13824, 40, 14.29)])
def test_real_scale_counts_match_hand_formula(tmp_path: Path, model: str, heads: int, ffn: int, layers: int,
                                              billions: float) -> None:
    cfg = _cfg(tmp_path, f"model={model}")
    counts = P.count_all(P.build_networks(cfg), cfg.lora)
    assert counts["teacher"].params == _wan_params(heads, ffn, layers)
    assert round(counts["teacher"].params / 1e9, 2) == billions
    assert 5.6e9 < counts["text_encoder"].params < 5.8e9  # UMT5-XXL encoder: 5.7 B
    assert 1.25e8 < counts["codec"].params < 1.30e8  # the Wan VAE: 127 M
    d = heads * 128  # the student adds the Δ-embedder (a time-MLP copy) and the gated fusion (D -> D -> D)
    delta, fusion = 256 * d + d + d * d + d, 2 * (d * d + d) + 2 * d + 1  # fusion: 2 Linear, offsets, gate
    assert counts["student"].params - counts["teacher"].params == delta + fusion
    per_block = 64 * (8 * (d + d) + 2 * (d + ffn))  # r (in + out) for 8 attention + 2 FFN Linear layers
    assert counts["teacher"].lora == layers * per_block


def test_lora_counts_match_peft(toy, toy_nets) -> None:
    cfg, _, counts = toy
    wan = copy.deepcopy(toy_nets[0])
    wan.add_adapter(LoraConfig(r=int(cfg.lora.rank), lora_alpha=int(cfg.lora.alpha),
                               target_modules=list(cfg.lora.target_modules)), adapter_name="fake_score")
    adapter = [p for n, p in wan.named_parameters() if "fake_score" in n]
    assert counts["teacher"].lora == sum(p.numel() for p in adapter) > 0
    assert counts["teacher"].lora_tensors == len(adapter)


# -- weights, gradients and AdamW states against a real optimizer step ------------------------------------------------
def _state_bytes(nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> int:
    params = [p for net in nets for p in net.parameters() if p.requires_grad]
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(p.nbytes + p.grad.nbytes for p in params) + sum(t.nbytes for t in state)


def _planned(cfg, counts, sizes, stage: str, mode: str) -> int:
    setup = P.Setup("single", 1, P.parse_precision(cfg.trainer.precision))
    rows = P.stage_memory(stage, mode, counts, sizes, setup, cfg)
    return int(rows["trainable weights"] + rows["gradients"] + rows["AdamW states"])


@pytest.mark.parametrize("stage", ["adapt_head", "distill", "distill_dmd2"])
def test_weights_grads_adamw_bytes_equal_a_real_step(toy, toy_nets, stage: str) -> None:
    cfg, sizes, counts = toy
    teacher = toy_nets[0]
    student = copy.deepcopy(toy_nets[1] if stage != "distill_dmd2" else teacher)
    nets = [student]
    if stage != "adapt_head":
        dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        disc = Discriminator(dim, tuple(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim))
        nets += [copy.deepcopy(teacher), disc]
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-5) for net in nets]
    C, T, h, w = sizes.latent
    x, text, t = torch.randn(1, C, T, h, w), torch.randn(1, sizes.text_len, sizes.text_dim), torch.rand(1)
    loss = (student(x, t, text) if stage != "distill_dmd2" else student(x, t * 1000, text, return_dict=False)[0]).sum()
    if stage != "adapt_head":
        loss = loss + nets[1](x, t * 1000, text, return_dict=False)[0].sum()
        loss = loss + sum(o.sum() for o in nets[2]([torch.randn(1, dim, T, h, w)] * len(cfg.model.disc_blocks)))
    loss.backward()
    for opt in optimizers:
        opt.step()
    assert _state_bytes(nets, optimizers) == _planned(cfg, counts, sizes, stage, "full")


def test_lora_fake_score_trains_only_the_adapter(toy) -> None:
    cfg, sizes, counts = toy
    setup = P.Setup("single", 1, P.parse_precision("32-true"))
    full, lora = (P.stage_memory("distill", m, counts, sizes, setup, cfg) for m in ("full", "LoRA fake"))
    assert full["gradients"] - lora["gradients"] == 4 * (counts["teacher"].params - counts["teacher"].lora)
    assert full["frozen weights (teacher, LoRA bases)"] == lora["frozen weights (teacher, LoRA bases)"]


# -- activations against what autograd keeps --------------------------------------------------------------------------
def _saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (parameters excluded)."""
    saved: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("mode", MIXED)
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("heads,ffn", [(4, 512), (2, 192)])
def test_block_saves_equal_autograd(tiny_wan_config: dict, mode: str, trainable: bool, heads: int, ffn: int) -> None:
    """One real Wan block: the bytes autograd saves equal the plan's count exactly (trainable: weights and
    conditioning get gradients; frozen: bf16 network in bf16 mode, only the hidden states get gradients)."""
    config = tiny_wan_config | {"num_attention_heads": heads, "attention_head_dim": 32, "ffn_dim": ffn,
                                "num_layers": 1}
    wan = WanTransformer3DModel(**config)
    if not trainable:
        wan.requires_grad_(False).to(torch.bfloat16 if mode == "bf16" else torch.float32)
    dtype = next(wan.parameters()).dtype
    rows, (frames, height, width), text_len = 2, (3, 4, 5), 7
    x = torch.randn(rows, config["in_channels"], frames, height, width, dtype=dtype)
    with _autocast(mode):
        inputs = embed(wan, x, torch.rand(rows), torch.randn(rows, text_len, config["text_dim"], dtype=dtype))
    hidden = inputs.hidden_states.detach().requires_grad_(True)
    text, modulation = (t.detach().requires_grad_(trainable) for t in (inputs.text, inputs.modulation))

    def forward() -> None:
        with _autocast(mode):
            wan.blocks[0](hidden, text, modulation, inputs.rotary_emb)

    measured = _saved_bytes(forward, list(wan.parameters()))
    sizes = P.Sizes((48, frames, height, width), (frames, height, width), text_len, heads * 32, ffn, heads, 32, 48,
                    config["text_dim"], 1)
    mixed = mode == "bf16"
    casts = 2 * sum(m.weight.numel() for m in wan.blocks[0].modules() if isinstance(m, torch.nn.Linear)) \
        if trainable and mixed else 0  # autocast's bf16 weight copies: the plan's own row
    assert measured == P.block_bytes(sizes, rows, trainable, mixed) \
        + P.call_constant_bytes(sizes, rows, trainable, mixed) + casts


@pytest.mark.parametrize("mode", MIXED)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_stage1_forward_activations_match_measured(toy, toy_nets, mode: str, checkpointing: bool) -> None:
    """The Stage-1 graph (backbone + one head call, with gradients) of the real toy student: the bytes alive at the
    end of the forward against the plan's calls (+ autocast's weight copies in bf16)."""
    cfg, sizes, counts = toy
    student = copy.deepcopy(toy_nets[1])
    if checkpointing:
        student.wan.enable_gradient_checkpointing()
    rows, (C, T, h, w) = 2, sizes.latent
    x, y1 = torch.randn(rows, C, T, h, w), torch.randn(rows, C, T, h, w)
    text, t, s = torch.randn(rows, sizes.text_len, sizes.text_dim), torch.rand(rows), torch.rand(rows)
    with _autocast(mode), P.TensorBytes() as tracker:
        m = student.backbone(x, t, text)
        u = student.average_velocity(y1, s, s / 2, m, y1)
        measured = tracker.live
    mixed, H, L = mode == "bf16", int(cfg.tmd.H), sizes.num_layers
    calls = (P.Call(L - H, rows, True, mixed, embed=True), P.Call(H, rows, True, mixed, heads=1))
    planned = sum(P.call_bytes(sizes, c, checkpointing) for c in calls) + (2 * counts["student"].linear if mixed else 0)
    assert u.requires_grad
    assert planned == pytest.approx(measured, rel=0.06 if checkpointing else 0.02)


@pytest.mark.parametrize("mode", MIXED)
def test_nograd_working_set_matches_measured_peak(toy, toy_nets, mode: str) -> None:
    _, sizes, _ = toy
    teacher = copy.deepcopy(toy_nets[0]).requires_grad_(False).to(torch.bfloat16 if mode == "bf16" else torch.float32)
    dtype, rows, (C, T, h, w) = next(teacher.parameters()).dtype, 4, sizes.latent
    x, text = torch.randn(rows, C, T, h, w, dtype=dtype), torch.randn(rows, sizes.text_len, sizes.text_dim, dtype=dtype)
    with torch.no_grad(), _autocast(mode), P.TensorBytes() as tracker:
        teacher(x, timestep=torch.rand(rows) * 1000, encoder_hidden_states=text, return_dict=False)
    assert P.working_set_bytes(sizes, rows, mode == "bf16") == pytest.approx(tracker.peak, rel=0.05)


def test_tensor_bytes_tracks_live_and_peak() -> None:
    with P.TensorBytes() as tracker:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2
        del a
        view = b[:10]  # a view: no new storage
    assert tracker.live == 4000 and tracker.peak == 8000 and view.shape == (10,)


# -- the entry point ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,strategy,devices", [("wan2.1_t2v_1.3b", "ddp", 8), ("wan2.1_t2v_14b", "fsdp", 8)])
def test_run_prints_and_writes_the_tables(tmp_path: Path, capsys, model: str, strategy: str, devices: int) -> None:
    cfg = _cfg(tmp_path, f"model={model}", f"strategy={strategy}", f"trainer.devices={devices}")
    result = P.run(cfg)
    out = capsys.readouterr().out
    written = (tmp_path / "out" / "plan.md").read_text()
    for text in (out, written):
        assert "| teacher | frozen |" in text and "| text encoder | frozen | 5,680,910,336 |" in text
        for stage, mode in P.COLUMNS:
            assert f"{stage} {mode}" in text
        for row in ("trainable weights", "gradients", "AdamW states", "activations, checkpointing", "fits 80 GiB"):
            assert f"| {row}" in text
    assert "tokens 21 x 30 x 52 = 32,760" in out and "effective NFE" in out
    single = P.plan(_cfg(tmp_path, f"model={model}", "strategy=single"))["memory"]
    for col, rows in result["memory"].items():
        factor = devices if strategy == "fsdp" else 1  # fsdp divides by the world size, ddp replicates
        assert rows["gradients"] == pytest.approx(single[col]["gradients"] / factor)
        assert rows["text encoder + VAE"] == single[col]["text encoder + VAE"]
        assert rows["activations, checkpointing"] == single[col]["activations, checkpointing"]
        assert rows["activations, checkpointing"] < rows["activations, no checkpointing"]
        assert all(math.isfinite(v) and v >= 0 for v in rows.values())
    if strategy == "ddp":  # DDP's buckets are a second float32 gradient copy
        assert all(r["DDP buckets / FSDP gathers"] == r["gradients"] for r in result["memory"].values())


def test_strategy_is_read_from_the_trainer_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert P.strategy_name(cfg) == "single"
    cfg.trainer.devices = 8
    assert P.strategy_name(cfg) == "ddp"
    OmegaConf.update(cfg, "trainer.strategy", {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"},
                     force_add=True)
    assert P.strategy_name(cfg) == "fsdp" and P.make_setup(cfg).world == 8
    OmegaConf.update(cfg, "trainer.num_nodes", 2, force_add=True)
    assert P.make_setup(cfg).world == 16
    cfg.strategy = "ddp"  # the plan's own key wins
    assert P.strategy_name(cfg) == "ddp"


@pytest.mark.skipif(not (CONFIG_DIR / "trainer" / "fsdp.yaml").is_file(), reason="no configs/trainer/fsdp.yaml")
def test_trainer_group_spelling(tmp_path: Path) -> None:
    """`trainer=fsdp` / `trainer=ddp` (the fit configs) are read for the strategy and DDP's bucket view."""
    fsdp = P.make_setup(_cfg(tmp_path, "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2"))
    assert (fsdp.strategy, fsdp.world) == ("fsdp", 16)
    cfg = _cfg(tmp_path, "trainer=ddp", "trainer.devices=8")
    ddp = P.make_setup(cfg)
    assert (ddp.strategy, ddp.world) == ("ddp", 8)
    assert ddp.bucket_view == bool(cfg.trainer.strategy.get("gradient_as_bucket_view", False))
    with pytest.raises(ValueError, match="trainer.devices=N"):
        P.make_setup(_cfg(tmp_path, "trainer=ddp", "trainer.devices=auto"))


def test_model_configs_hold_the_paper_values(tmp_path: Path) -> None:
    small, large = (_cfg(tmp_path, f"model={m}").model for m in ("wan2.1_t2v_1.3b", "wan2.1_t2v_14b"))
    stage1 = OmegaConf.load(CONFIG_DIR / "stage" / "adapt_head.yaml")
    distill = OmegaConf.load(CONFIG_DIR / "stage" / "distill.yaml")
    for m in (small, large):
        assert m.transformer_config is None  # training still reads the architecture from the weights' folder
        assert (m.num_frames, m.height, m.width, m.head_blocks) == (81, 480, 832, 5)
        assert m.recipe.distill.lr == distill.optimizer.lr == 1e-5
    assert (small.recipe.adapt_head.lr, small.recipe.adapt_head.loss_c) == (stage1.optimizer.lr, stage1.loss_c)
    assert (large.recipe.adapt_head.lr, large.recipe.adapt_head.loss_c) == (1e-5, 1e-5)
    assert (small.recipe.distill.iterations, large.recipe.distill.iterations) == (4000, 1000)
    assert list(small.disc_blocks) == [15, 22, 29] and list(large.disc_blocks) == [19, 29, 39]
    if "lora" in distill:  # the plan's LoRA column is stage.lora
        plan_lora = _cfg(tmp_path).lora
        assert {k: distill.lora[k] for k in plan_lora} == dict(plan_lora)


# -- FSDP2 with the bf16 MixedPrecisionPolicy (runtime/parallel.py), verdicts, experiment=wan_* ----------------------
D14, F14, L14, H = 5120, 13824, 40, 5
# one Wan 14B block by hand: 8 attention Linear, q/k norms, FFN, affine norm2, scale_shift_table
BLOCK14 = 8 * D14 * D14 + 8 * D14 + 4 * D14 + 2 * D14 * F14 + F14 + D14 + 2 * D14 + 6 * D14
BLOCK14_LINEAR = 8 * (D14 * D14 + D14) + (D14 * F14 + F14) + (F14 * D14 + D14)  # its 8 attention + 2 FFN Linear layers


def _fsdp14(tmp_path: Path, *overrides: str) -> dict:
    return P.plan(_cfg(tmp_path, "model=wan2.1_t2v_14b", "trainer=fsdp", "trainer.devices=8", "encoders_on_gpu=false",
                       *overrides))


def test_fsdp_bf16_policy_gathers_and_copies_match_hand_computation(tmp_path: Path) -> None:
    bf16, fp32 = _fsdp14(tmp_path), _fsdp14(tmp_path, "fsdp_param_dtype=null")
    c = bf16["counts"]
    assert c["teacher"].block == BLOCK14 and c["teacher"].block_linear == BLOCK14_LINEAR and c["teacher"].blocks == L14
    gathers = "DDP buckets / FSDP gathers"
    # bf16: 2 gathered bf16 blocks + the bf16 unsharded gradient + its float32 copy for the reduce-scatter
    assert bf16["memory"][("distill", "full")][gathers] == BLOCK14 * (2 * 2 + 2 + 4)
    assert fp32["memory"][("distill", "full")][gathers] == BLOCK14 * (2 * 4 + 4)  # float32 gathers and gradient
    # Stage 1 gathers its head blocks in float32 (fd_full_precision): the float32 figure
    assert bf16["memory"][("adapt_head", "full")][gathers] == BLOCK14 * 12
    copies = "autocast bf16 weight copies"
    s, t, d = c["student"], c["teacher"], c["discriminator"]
    assert bf16["memory"][("distill", "full")][copies] == 0  # bf16 gathered weights: nothing for autocast to copy
    assert fp32["memory"][("distill", "full")][copies] == 2 * max(s.linear + d.linear, t.linear + d.linear)
    # Stage 1: H float32 head blocks + the root unit's Linear weights (patch, text, time embedders, Δ, fusion, head)
    root = s.linear - L14 * BLOCK14_LINEAR
    assert bf16["memory"][("adapt_head", "full")][copies] == 2 * (H * BLOCK14_LINEAR + root)
    assert fp32["memory"][("adapt_head", "full")][copies] == 2 * s.linear
    # master weights stay float32 and sharded; the frozen teacher is bf16 and sharded
    full = bf16["memory"][("distill", "full")]
    assert full["trainable weights"] == (s.params + t.params + d.params) * 4 / 8
    assert full["frozen weights (teacher, LoRA bases)"] == t.params * 2 / 8
    for ckpt in ("total, checkpointing", "total, no checkpointing"):  # the totals differ by exactly those two rows
        assert fp32["memory"][("distill", "full")][ckpt] - full[ckpt] == pytest.approx(
            fp32["memory"][("distill", "full")][copies] + fp32["memory"][("distill", "full")][gathers]
            - full[copies] - full[gathers])


def test_verdicts_per_gpu_size(tmp_path: Path) -> None:
    result = _fsdp14(tmp_path)
    rows = {(r["stage"], r["mode"]): r for r in result["verdicts"]}
    need = result["memory"][("distill", "full")]["total, checkpointing"]
    assert rows[("distill", "full")]["need"] == need and 79.6 * P.GIB < need <= 140.4 * P.GIB
    assert rows[("distill", "full")]["fits"] == {"80 GB": False, "141 GB": True}
    assert not rows[("distill", "LoRA fake")]["supported"] and rows[("adapt_head", "full")]["supported"]
    table = P.verdict_table(result["verdicts"], _cfg(tmp_path), result["setup"], True)
    assert "| 80 GB (79.6 GiB) | 141 GB (140.4 GiB) |" in table and "LoRA is refused under FSDP2" in table
    assert "- 141 GB: fits adapt_head full, distill full, distill_dmd2 full" in table


@pytest.mark.parametrize("experiment,stage", [("wan_adapt_head", "adapt_head"), ("wan_distill", "distill"),
                                              ("wan_distill_dmd2", "distill_dmd2")])
def test_experiment_plans_its_own_stage_from_the_fit_config(tmp_path: Path, capsys, experiment: str,
                                                            stage: str) -> None:
    cfg = P.experiment_config([f"experiment={experiment}", "model=wan2.1_t2v_14b", "trainer=fsdp",
                               "trainer.devices=8", f"output_dir={tmp_path}/out"])
    assert (cfg.plan_stage, cfg.activation_checkpointing, cfg.encoders_on_gpu) == (stage, True, False)
    assert cfg.fsdp_param_dtype == "bfloat16" and cfg.micro_batch == 1 and cfg.video.num_frames == 81
    result = P.run(cfg)
    assert {col[0] for col in result["memory"]} == {stage}
    out = capsys.readouterr().out
    assert f"experiment={experiment}" in out and "## Verdict per GPU size" in out
    assert (tmp_path / "out" / "plan.md").is_file()
