"""Text encoders: the tiny encoder (save / load with a sha256 check, truncation and unknown words counted, batch
independence), hf:PATH on tiny random transformers models the tests build themselves (BERT, GPT-2, Gemma3), and one
clear line for every missing piece."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from nit_lightning.data.saved import save_payload
from nit_lightning.data.text_encoders import text_encoder_from_description, text_encoder_from_spec
from nit_lightning.data.tinytext import (
    TinyTextConfig,
    load_tiny_text_encoder,
    make_tiny_text_encoder,
    prompt_words,
    save_tiny_text_encoder,
    vocabulary_of,
)

TEXTS = ["a red triangle", "a small blue ring", "an orange disc", "red stripes"]
WORDS = ["a", "an", "red", "blue", "orange", "green", "small", "triangle", "ring", "disc", "stripes"]


@pytest.fixture()
def tiny_file(tmp_path):
    encoder = make_tiny_text_encoder(TEXTS, TinyTextConfig(dim=16, max_length=4, layers=1, heads=2))
    path = tmp_path / "tiny.pt"
    save_tiny_text_encoder(encoder, path)
    return path


def test_tokenizer_and_vocabulary():
    assert prompt_words("A red, SMALL ring.") == ["a", "red", "small", "ring"]
    assert vocabulary_of(TEXTS) == vocabulary_of(reversed(TEXTS)) == sorted(set(" ".join(TEXTS).split()))


def test_tiny_encoder_save_load_is_exact_and_describes_itself(tiny_file):
    encoder = text_encoder_from_spec(f"tinytext:{tiny_file}")
    prompts = ["a red triangle", "", "red stripes", "a small blue ring"]
    out = encoder.encode(prompts)
    assert out.lengths.tolist() == [3, 0, 2, 4] and out.tokens.shape == (9, 16) and out.tokens.dtype == torch.float32
    description = encoder.describe()
    assert description["type"] == "tinytext" and description["dim"] == 16 and len(description["sha256"]) == 64
    again = text_encoder_from_description(json.loads(json.dumps(description)))
    assert torch.equal(again.encode(prompts).tokens, out.tokens)
    # Same texts and config -> same weights (the seed is in the config); another seed -> other weights.
    remade = make_tiny_text_encoder(reversed(TEXTS), TinyTextConfig(dim=16, max_length=4, layers=1, heads=2))
    assert torch.equal(remade.encode(prompts).tokens, out.tokens)
    other = make_tiny_text_encoder(TEXTS, TinyTextConfig(dim=16, max_length=4, layers=1, heads=2, seed=1))
    assert not torch.equal(other.encode(prompts).tokens, out.tokens)
    packed = out.packed()
    assert [c.shape[0] for c in packed.split()] == [3, 0, 2, 4]


def test_tiny_encoder_encodes_each_prompt_independently_of_its_batch(tiny_file):
    encoder = load_tiny_text_encoder(tiny_file)
    alone = encoder.encode(["a small blue ring"]).tokens
    batch = encoder.encode(["red stripes", "a small blue ring", "a red triangle"])
    assert torch.equal(batch.packed().split()[1], alone)


def test_changed_file_fails_the_sha256_check(tiny_file):
    description = load_tiny_text_encoder(tiny_file).describe()
    other = make_tiny_text_encoder(TEXTS, TinyTextConfig(dim=16, max_length=4, layers=1, heads=2, seed=3))
    save_tiny_text_encoder(other, tiny_file)  # same path, other weights
    with pytest.raises(ValueError, match=r"has sha256 .*but the caption tokens were made with"):
        text_encoder_from_description(description)


def test_truncation_and_unknown_words_are_counted_and_logged(tiny_file, caplog):
    encoder = load_tiny_text_encoder(tiny_file)
    with caplog.at_level(logging.WARNING):
        out = encoder.encode(["a small blue ring on a table", "a red triangle", "a green triangle", "a ring"])
    assert out.truncated == 1 and out.lengths.tolist() == [4, 3, 3, 2]  # cut to max_length = 4 words
    assert out.unknown == 1  # "green" is not in the vocabulary; the cut words "on a table" are not counted
    assert encoder.truncated_total == 1 and encoder.prompts_total == 4
    text = caplog.text
    assert "1 of 4 prompts were longer than tinytext's 4 tokens and were truncated" in text
    assert "1 of 4 prompts have words outside the tinytext vocabulary" in text and "'green'" in text


def test_bad_tiny_files_and_specs_are_one_line_errors(tmp_path, tiny_file):
    cases = [
        (lambda: text_encoder_from_spec(f"tinytext:{tmp_path / 'absent.pt'}"), FileNotFoundError, "not found"),
        (lambda: text_encoder_from_spec("tinytext:"), ValueError, "needs a path"),
        (lambda: text_encoder_from_spec("t5:/models/t5"), ValueError, "is not hf:PATH"),
        (lambda: text_encoder_from_spec(f"tinytext:{tiny_file}", max_length=8), ValueError, "keep the max_length"),
        (lambda: text_encoder_from_description({"type": "clip"}), ValueError, "expected type 'hf' or 'tinytext'"),
    ]
    (tmp_path / "tinyae.pt").write_bytes(b"")
    save_payload(tmp_path / "other.pt", {"kind": "nit-tinyae", "version": 1})
    cases.append((lambda: load_tiny_text_encoder(tmp_path / "other.pt"), ValueError, "kind 'nit-tinyae'"))
    for make, kind, message in cases:
        with pytest.raises(kind, match=message) as info:
            make()
        assert "\n" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="never saved"):
        make_tiny_text_encoder(TEXTS).describe()
    with pytest.raises(ValueError, match="list of prompt strings"):
        load_tiny_text_encoder(tiny_file).encode("a red ring")


# --- hf:PATH -------------------------------------------------------------------------------------------------------


def _hf_folder(root, kind: str):
    """A tiny random transformers model + word-level tokenizer saved the way a downloaded model folder looks."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    pad = {} if kind == "gpt2" else {"pad_token": "[PAD]"}  # GPT-2 ships without a pad token
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]",
                                                     eos_token="[EOS]", **pad)
    sizes = dict(vocab_size=len(vocab))
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=64,
                                                               max_position_embeddings=64, **sizes))
    elif kind == "gpt2":
        model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                               bos_token_id=2, eos_token_id=3, **sizes))
    else:  # the paper's encoder family, saved as a causal LM like google/gemma-3-1b-it
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3, **sizes))
    folder = root / kind
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["bert", "gpt2", "gemma3"])
def test_hf_encoder_on_a_local_tiny_model(tmp_path, kind, caplog):
    folder = _hf_folder(tmp_path, kind)
    encoder = text_encoder_from_spec(f"hf:{folder}", max_length=5)
    assert encoder.dim == 32 and encoder.max_length == 5
    prompts = ["a red triangle", "a small blue ring", "", "an orange disc"]
    with caplog.at_level(logging.WARNING):
        out = encoder.encode(prompts + ["a small orange ring a red disc"])
    # [BOS] + words, cut to 5 tokens; the empty prompt is [BOS] alone (the null caption is length 0, not "")
    assert out.lengths.tolist() == [4, 5, 1, 4, 5] and out.tokens.shape == (19, 32)
    assert out.truncated == 1 and "1 of 5 prompts were longer than hf's 5 tokens" in caplog.text
    # Padding never reaches a real token: each prompt alone gives its rows of the padded batch.
    for prompt, rows in zip(prompts, out.packed().split()):
        torch.testing.assert_close(encoder.encode([prompt]).tokens, rows, rtol=1e-5, atol=1e-5)
    description = json.loads(json.dumps(encoder.describe()))
    assert description["type"] == "hf" and description["dim"] == 32 and description["max_length"] == 5
    assert torch.equal(text_encoder_from_description(description).encode(prompts).tokens, encoder.encode(prompts).tokens)


def test_hf_description_refuses_a_changed_folder(tmp_path):
    folder = _hf_folder(tmp_path, "bert")
    description = text_encoder_from_spec(f"hf:{folder}").describe()
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the model changed since"):
        text_encoder_from_description(description)


def test_hf_loader_names_what_is_missing_in_one_line(tmp_path, monkeypatch):
    folder = _hf_folder(tmp_path, "bert")

    def expect(spec, kind, message, **kw):
        with pytest.raises(kind, match=message) as info:
            text_encoder_from_spec(spec, **kw)
        assert "\n" not in str(info.value), str(info.value)

    expect(f"hf:{tmp_path / 'absent'}", FileNotFoundError, "text encoder folder .*absent' not found; .*never downloads")
    expect("hf:", ValueError, "needs a path")
    expect(f"hf:{folder}", ValueError, "can read \\(64 positions\\)", max_length=100)
    weights = folder / "model.safetensors"
    weights.rename(tmp_path / "weights.bak")
    expect(f"hf:{folder}", FileNotFoundError, "has no weights")
    (tmp_path / "weights.bak").rename(weights)
    (folder / "tokenizer.json").rename(tmp_path / "tokenizer.bak")
    expect(f"hf:{folder}", FileNotFoundError, "has no tokenizer")
    (tmp_path / "tokenizer.bak").rename(folder / "tokenizer.json")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    expect(f"hf:{folder}", FileNotFoundError, "has no config.json")
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))  # weights for 2 layers only
    expect(f"hf:{folder}", ValueError, "lacks weights for .* parameters")
    (folder / "config.json").write_text(json.dumps(config))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    expect(f"hf:{folder}", ValueError, "could not be loaded by transformers")
    (folder / "config.json").write_text("{not json")
    expect(f"hf:{folder}", ValueError, "could not be loaded by transformers")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    expect(f"hf:{folder}", ValueError, "needs the transformers package")
