"""Frozen text encoders (docs/method.md §6, §7): the shipped toy T5 and the UMT5 loading path."""

from __future__ import annotations

import pytest
import torch

from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder, build_toy_text_encoder
from tmd_lightning.models.text_encoders import TOY_VOCAB

VOCAB = {w: i for i, w in enumerate(TOY_VOCAB)}
PAD, EOS, UNK = VOCAB["<pad>"], VOCAB["</s>"], VOCAB["<unk>"]


@pytest.fixture(scope="module")
def toy_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


@pytest.fixture(scope="module")
def hf_t5():
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(TOY_MODEL_DIR / "text_encoder"), local_files_only=True).eval()


def _reference_ids(captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made word-level tokenisation: words, then </s>, then padding (independent of the HF tokenizer)."""
    ids, mask = [], []
    for c in captions:
        row = [VOCAB[w] for w in c.lower().split()][: max_length - 1] + [EOS]
        mask.append([1] * len(row) + [0] * (max_length - len(row)))
        ids.append(row + [PAD] * (max_length - len(row)))
    return torch.tensor(ids), torch.tensor(mask)


def test_toy_tokenizer_knows_every_toy_caption(toy_encoder):
    captions = all_captions()
    assert len(captions) == 48
    tok = toy_encoder.tokenizer(captions, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert UNK not in tok.input_ids.tolist()[0] and (tok.input_ids != UNK).all()
    ref_ids, ref_mask = _reference_ids(captions, 8)
    assert torch.equal(tok.input_ids, ref_ids)
    assert torch.equal(tok.attention_mask, ref_mask)
    # an unknown word does map to <unk> (so the check above can fail)
    assert UNK in toy_encoder.tokenizer("a purple hexagon").input_ids


def test_toy_encoder_shape_zero_padding_and_reference(toy_encoder, hf_t5):
    captions = all_captions()[:5] + ["a red square moving left"]
    emb = toy_encoder(captions)
    assert emb.shape == (6, 8, 64)
    assert emb.dtype == torch.float32
    assert toy_encoder.dim == 64
    # 5 words + </s> = 6 real tokens; everything past them is exactly zero, everything before is not
    assert torch.count_nonzero(emb[:, 6:]) == 0
    assert (emb[:, :6].abs().sum(-1) > 0).all()
    # independent reference: a direct call of the HF encoder with hand-made ids, masked
    ids, mask = _reference_ids(captions, 8)
    with torch.no_grad():
        ref = hf_t5(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)


def test_toy_encoder_empty_caption_is_only_eos(toy_encoder, hf_t5):
    emb = toy_encoder([""])
    assert emb.shape == (1, 8, 64)
    assert emb[0, 0].abs().sum() > 0
    assert torch.count_nonzero(emb[0, 1:]) == 0
    with torch.no_grad():
        ref = hf_t5(input_ids=torch.tensor([[EOS]])).last_hidden_state[0, 0]
    torch.testing.assert_close(emb[0, 0], ref, atol=1e-5, rtol=1e-5)


def test_toy_encoder_rows_do_not_depend_on_batch(toy_encoder):
    caps = all_captions()
    together = toy_encoder._encode(caps[:4])
    alone = torch.cat([toy_encoder._encode([c]) for c in caps[:4]])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_toy_encoder_cache():
    te = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    caps = all_captions()
    first = te([caps[0], caps[1], caps[0]])
    assert set(te._cache) == {caps[0], caps[1]}
    assert torch.equal(first[0], first[2])
    again = te([caps[1], caps[0]])
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    # cached tensors equal freshly computed ones
    torch.testing.assert_close(te._encode([caps[0]])[0], again[1], atol=1e-6, rtol=0)
    # moving the module clears the cache (cached tensors would sit on the old device)
    te.float()
    assert te._cache == {}


def test_toy_encoder_cache_is_bounded():
    te = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    te.cache_size = 2
    caps = all_captions()[:5]
    out = te(caps)  # more new captions than the cache holds
    assert len(te._cache) <= 2
    torch.testing.assert_close(out, te._encode(caps), atol=1e-5, rtol=1e-5)


def test_toy_encoder_full_cache_does_not_evict_a_caption_of_the_same_batch():
    """Regression: with a full cache, encoding a new caption evicted the oldest entry even when the current
    batch still needed it, and the lookup then raised KeyError."""
    te = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    te.cache_size = 2
    caps = all_captions()
    te([caps[0]])
    te([caps[1]])  # cache full: caps[0] is the oldest
    out = te([caps[0], caps[2]])
    torch.testing.assert_close(out, te._encode([caps[0], caps[2]]), atol=1e-5, rtol=1e-5)
    assert len(te._cache) == 2 and caps[2] in te._cache


def test_toy_encoder_cache_size_zero_disables_caching():
    te = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    te.cache_size = 0
    caps = all_captions()[:3]
    torch.testing.assert_close(te(caps), te._encode(caps), atol=1e-5, rtol=1e-5)
    assert te._cache == {}


def test_toy_encoder_is_frozen(toy_encoder):
    assert not any(p.requires_grad for p in toy_encoder.parameters())
    assert not toy_encoder.encoder.training


def _orthogonal_scaled(words: torch.Tensor, scale: float = 8.0) -> bool:
    d = words.shape[1]
    gram = words.double() @ words.double().T / (scale * d**0.5) ** 2
    return bool((gram - torch.eye(words.shape[0], dtype=torch.float64)).abs().max() < 1e-5)


def test_build_toy_text_encoder_is_deterministic_and_shaped_like_the_shipped_one(tmp_path):
    """Two builds with one seed are identical; the shipped encoder and a build both have orthogonal word embeddings
    scaled by 8 sqrt(d). (Bit-equality with the shipped folder would pin the transformers version that wrote it:
    transformers 5.24 initialises T5 with another random stream than 5.23 did.)"""
    from safetensors.torch import load_file

    first, second = build_toy_text_encoder(tmp_path / "a"), build_toy_text_encoder(tmp_path / "b")
    a = load_file(str(first / "text_encoder" / "model.safetensors"))
    b = load_file(str(second / "text_encoder" / "model.safetensors"))
    shipped = load_file(str(TOY_MODEL_DIR / "text_encoder" / "model.safetensors"))
    assert sorted(a) == sorted(b) == sorted(shipped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].shape == shipped[k].shape for k in a)
    assert _orthogonal_scaled(shipped["shared.weight"]) and _orthogonal_scaled(a["shared.weight"])
    te = TextEncoder.from_pretrained(first, max_length=8, model_class="T5EncoderModel")
    ref = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    caps = all_captions()[::12]
    assert te(caps).shape == ref(caps).shape


def test_build_toy_text_encoder_seed_matters(tmp_path):
    from safetensors.torch import load_file

    build_toy_text_encoder(tmp_path, seed=1)
    shipped = load_file(str(TOY_MODEL_DIR / "text_encoder" / "model.safetensors"))
    built = load_file(str(tmp_path / "text_encoder" / "model.safetensors"))
    assert not torch.equal(shipped["shared.weight"], built["shared.weight"])


def test_unknown_words_are_warned_about_once_per_caption(caplog):
    encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    encoder.cache_size = 0  # every call encodes: the warning itself must not repeat
    with caplog.at_level("WARNING", logger="tmd_lightning.models.text_encoders"):
        encoder(all_captions()[:4] + [""])
        assert not caplog.records  # every toy word, and the empty negative prompt, are known
        encoder(["a Purple square moving left", "a purple square moving left"])
        encoder(["a Purple square moving left"])  # the same caption again: no second warning
    messages = [r.getMessage() for r in caplog.records]
    unknown = [m.split("does not know")[1].split("(")[0] for m in messages]
    assert unknown == [" ['Purple'] ", " ['purple'] "]
    assert "red" in messages[0]  # the toy's vocabulary is small enough to list


def test_missing_text_encoder_folder_raises(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        TextEncoder.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------- UMT5 path

UMT5_WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "at", "night"]


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("umt5")
    vocab = {w: i for i, w in enumerate(UMT5_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(config).save_pretrained(str(root / "text_encoder"))
    return root


def test_umt5_path_zero_padding_and_reference(umt5_dir):
    from transformers import UMT5EncoderModel

    te = TextEncoder.from_pretrained(umt5_dir, max_length=16)  # default model_class: UMT5EncoderModel
    assert isinstance(te.encoder, UMT5EncoderModel)
    assert te.dim == 32
    captions = ["a cat runs on the beach at night", "a dog", ""]
    lengths = [9, 3, 1]  # words + </s>
    emb = te(captions)
    assert emb.shape == (3, 16, 32)
    for row, n in zip(emb, lengths, strict=True):
        assert torch.count_nonzero(row[n:]) == 0
        assert (row[:n].abs().sum(-1) > 0).all()
    vocab = {w: i for i, w in enumerate(UMT5_WORDS)}
    ids = torch.zeros(3, 16, dtype=torch.long)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, c in enumerate(captions):
        row = [vocab[w] for w in c.split()] + [1]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    direct = UMT5EncoderModel.from_pretrained(str(umt5_dir / "text_encoder")).eval()
    with torch.no_grad():
        ref = direct(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)


def test_umt5_path_truncates_to_max_length(umt5_dir):
    te = TextEncoder.from_pretrained(umt5_dir, max_length=4)
    emb = te(["a cat runs on the beach at night"])
    assert emb.shape == (1, 4, 32)
    assert (emb[0].abs().sum(-1) > 0).all()  # all 4 positions are real tokens
