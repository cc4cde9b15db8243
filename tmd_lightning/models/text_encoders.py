"""Frozen text encoders with their tokenizers, loaded from local folders (docs/method.md §6, §7).

Real scale: UMT5 (`text_encoder/` + `tokenizer/` of a Wan2.1 diffusers folder). Toy: a tiny random T5 encoder
with a word-level tokenizer, shipped in the package, so nothing is downloaded. Both return embeddings of a fixed
length with every position past a caption's real length set to zero — Wan's cross-attention has no mask, and this
is what the diffusers Wan pipeline feeds it.

Training from a precomputed cache (`python -m tmd_lightning.precompute`), `CachedTextEncoder` stands in for the
text encoder: it serves the prompt embeddings stored in the cache (the negative prompt, evaluation prompts) and
never loads the encoder (UMT5-XXL alone is 5.7B parameters).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from tmd_lightning.models.folders import TRANSFORMERS_WEIGHTS, local_folder, require_safetensors

log = logging.getLogger(__name__)
PROMPTS_FILE = "prompts.safetensors"  # in a cache folder: prompt embeddings trimmed to their real length

TOY_VOCAB = ["<pad>", "</s>", "<unk>", "a", "an", "the", "moving", "red", "green", "blue", "yellow", "square",
             "circle", "triangle", "left", "right", "up", "down"]


class TextEncoder(nn.Module):
    """Tokenizer + frozen encoder -> (B, max_length, D) embeddings, zero past each caption's length.

    Embeddings of recently seen captions are cached (the toy world has 48 captions; real runs use precomputed
    caches instead).
    """

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int = 512, cache_size: int = 4096) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    @property
    def dim(self) -> int:
        return int(self.encoder.config.d_model)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 512, model_class: str = "UMT5EncoderModel",
                        dtype: torch.dtype | str = torch.float32,
                        cache_dir: str | Path | None = None) -> TextEncoder | CachedTextEncoder:
        """Loads `tokenizer/` and `text_encoder/` from a diffusers-style folder (no download).

        With `cache_dir` (a precompute cache; `data=cache` sets it) the encoder is not loaded: a `CachedTextEncoder`
        serves the cache's stored prompt embeddings instead, checked against `path`'s text encoder width.
        """
        import transformers

        path = Path(path)
        if cache_dir is not None:
            return CachedTextEncoder.from_cache(cache_dir, max_length, expected_dim=_config_dim(path))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not local_folder(path).joinpath("text_encoder").is_dir():
            raise FileNotFoundError(f"{path}: no text_encoder/ folder (expected a diffusers-style model folder)")
        require_safetensors(path / "text_encoder", TRANSFORMERS_WEIGHTS)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        encoder = getattr(transformers, model_class).from_pretrained(
            str(path / "text_encoder"), torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        return cls(tokenizer, encoder, max_length)

    @torch.no_grad()
    def _encode_with_lengths(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_length, D) embeddings zeroed past each caption's length, and the lengths (token counts)."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        self._warn_unknown_words(captions, tok.input_ids)
        device = next(self.encoder.parameters()).device
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return hidden * mask.unsqueeze(-1), mask.sum(dim=1)

    def _warn_unknown_words(self, captions: list[str], ids: torch.Tensor) -> None:
        """Warns (once per caption) about words the tokenizer does not know: each becomes the same unknown token, so
        the model cannot tell them apart, and a toy prompt outside the toy's words samples something arbitrary."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None:
            return
        for caption, row in zip(captions, ids, strict=True):
            if caption in self._warned or not bool((row == unk).any()):
                continue
            self._warned.add(caption)
            words = [w for w in caption.split() if unk in self.tokenizer(w, add_special_tokens=False).input_ids]
            vocab = [w for w in self.tokenizer.get_vocab() if w not in self.tokenizer.all_special_tokens]
            known = f"; it knows only: {', '.join(sorted(vocab))}" if len(vocab) <= 64 else ""
            log.warning("prompt %r: the text encoder's tokenizer does not know %s (each becomes %s)%s", caption,
                        words, self.tokenizer.unk_token, known)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        return self._encode_with_lengths(captions)[0]

    def encode_trimmed(self, captions: list[str]) -> list[torch.Tensor]:
        """One (length, D) embedding per caption, trimmed to its real token count: what caches store (zero padding
        to `max_length` happens again at collate time)."""
        hidden, lengths = self._encode_with_lengths(captions)
        return [row[: int(n)] for row, n in zip(hidden, lengths, strict=True)]

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        # look up this batch's captions before inserting: eviction must not drop an entry the batch still needs
        found = {c: self._cache[c] for c in dict.fromkeys(captions) if c in self._cache}
        todo = [c for c in dict.fromkeys(captions) if c not in found]
        if todo:
            for caption, emb in zip(todo, self._encode(todo), strict=True):
                found[caption] = emb
                if self.cache_size <= 0:
                    continue
                if len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[caption] = emb
        device = next(self.encoder.parameters()).device
        return torch.stack([found[c].to(device) for c in captions])

    def _apply(self, fn, recurse: bool = True):  # moving the module invalidates cached tensors' device
        self._cache.clear()
        return super()._apply(fn, recurse)


def _config_dim(path: Path) -> int | None:
    """d_model of the text encoder in a diffusers folder, read from its config (no weights); None if absent."""
    config = path / "text_encoder" / "config.json"
    return int(json.loads(config.read_text())["d_model"]) if config.is_file() else None


def save_prompt_embeddings(path: str | Path, embeddings: dict[str, torch.Tensor]) -> Path:
    """Writes {caption: (length, D) trimmed embedding} as one safetensors file (atomically), captions in metadata."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    captions = list(embeddings)
    tensors = {f"prompt.{i}": embeddings[c].contiguous().cpu() for i, c in enumerate(captions)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
    os.replace(tmp, path)
    return path


class UnknownPromptError(KeyError):
    """A caption a `CachedTextEncoder` has no stored embedding for."""

    def __str__(self) -> str:  # KeyError would print the message with quotes and escapes
        return str(self.args[0])


def zero_pad_text(trimmed: list[torch.Tensor], length: int) -> torch.Tensor:
    """(B, length, D) float32 embeddings from per-prompt (tokens, D) ones trimmed to their real length, zero past
    each prompt's tokens, as the text encoder returns them (Wan's cross-attention has no mask)."""
    text = torch.zeros(len(trimmed), length, trimmed[0].shape[-1])
    for row, t in zip(text, trimmed, strict=True):
        row[: t.shape[0]] = t.float()
    return text


class CachedTextEncoder(nn.Module):
    """Stands in for a text encoder when training from a cache: serves stored prompt embeddings, loads no encoder.

    Returns (B, max_length, D) float embeddings zero-padded past each prompt's stored length, like `TextEncoder`;
    any caption that is not stored is an `UnknownPromptError` that says how to add it. The embeddings are a
    non-persistent buffer, so they follow the module to its device and stay out of checkpoints.
    """

    def __init__(self, embeddings: dict[str, torch.Tensor], max_length: int, source: str = "") -> None:
        super().__init__()
        if not embeddings:
            raise ValueError(f"no prompt embeddings{' in ' + source if source else ''}")
        longest = max(e.shape[0] for e in embeddings.values())
        if longest > max_length:
            raise ValueError(f"{source}: a stored prompt has {longest} tokens, more than max_length={max_length}")
        self.max_length, self.source = max_length, source
        self.rows = {caption: i for i, caption in enumerate(embeddings)}
        table = zero_pad_text(list(embeddings.values()), max_length)
        self.register_buffer("table", table, persistent=False)

    @property
    def dim(self) -> int:
        return int(self.table.shape[-1])

    @classmethod
    def from_cache(cls, cache_dir: str | Path, max_length: int, expected_dim: int | None = None) -> CachedTextEncoder:
        """The prompts of a precompute cache folder; `expected_dim` (the run's text encoder width) is checked."""
        from safetensors import safe_open

        path = Path(cache_dir) / PROMPTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {cache_dir} is not a finished cache (run the command that "
                                    "writes it to completion: `python -m tmd_lightning.precompute ... output=DIR`, "
                                    "or `python -m tmd_lightning.kd_pairs` for KD pairs)")
        with safe_open(str(path), framework="pt") as fh:
            captions = json.loads(fh.metadata()["captions"])
            embeddings = {c: fh.get_tensor(f"prompt.{i}") for i, c in enumerate(captions)}
        encoder = cls(embeddings, max_length, source=str(path))
        if expected_dim is not None and encoder.dim != expected_dim:
            raise ValueError(f"{path}: text embeddings of width {encoder.dim}, but the run's text encoder has "
                             f"d_model {expected_dim}: the cache was made with another model")
        return encoder

    def forward(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if missing:
            raise UnknownPromptError(
                f"no cached text embedding for {missing[:3]} ({len(missing)} prompt(s)); {self.source} stores only "
                "the negative prompt and the precompute `prompts`: rerun `python -m tmd_lightning.precompute` with "
                "prompts=FILE listing them (evaluation prompts), or train without the cache")
        return self.table[[self.rows[c] for c in captions]]


def build_toy_text_encoder(path: str | Path, d_model: int = 64, num_layers: int = 2, seed: int = 0,
                           embedding_scale: float = 8.0) -> Path:
    """Writes the toy text encoder (random frozen T5 + word-level tokenizer) in the diffusers folder layout.

    With T5's default initialisation the random layers mix the words so much that the four direction words come
    out with cosine similarity 0.4-0.5 to each other at their own position (colour and shape words: about 0), and a
    teacher learned colour at once but ignored direction for thousands of steps. The word embeddings are therefore
    orthogonal (the vocabulary is smaller than `d_model`) and scaled by `embedding_scale` relative to T5's
    unit-variance init, which keeps each word's identity dominant in its output while the encoder stays contextual.

    The shipped folder (`assets/toy_wan`) was written by this function with transformers 5.23; the random layers come
    from T5's own initialisation, so another transformers version may write other (equally valid) weights. The
    shipped encoder is the one the toy teacher was trained with: keep it, do not rebuild it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = Path(path)
    vocab = {w: i for i, w in enumerate(TOY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path / "tokenizer"))
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(config)
    generator = torch.Generator().manual_seed(seed)  # its own stream: independent of how transformers initialises
    with torch.no_grad():  # orthogonal words whose identity dominates the random layers' mixing (see docstring)
        torch.nn.init.orthogonal_(model.shared.weight, generator=generator)
        model.shared.weight.mul_(embedding_scale * d_model**0.5)
    model.save_pretrained(str(path / "text_encoder"))
    return path
