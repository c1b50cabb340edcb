"""The tiny text encoder behind `tinytext:PATH`: a word-level tokenizer and a small random transformer, frozen.

It plays Gemma's part on a CPU: it turns each word of a prompt into a distinct vector (a random embedding, nearly
orthogonal to the others), adds a position, and mixes the words with `layers` small transformer layers, so "a red
ring" and "a ring, red" are different token sequences whose words stay recognisable. Nothing is trained: NiT-T2I's own
caption projection and cross-attention learn to read it, as they learn to read a frozen LLM's hidden states.
Saved with data/saved.py (kind + version, no pickle) and rebuilt with a sha256 check, like `tinyae`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from nit_lightning.data.saved import file_sha256, load_payload, save_payload
from nit_lightning.data.text_encoders import EncodedPrompts, TextEncoder

log = logging.getLogger(__name__)

KIND = "nit-tinytext"
FORMAT_VERSION = 1
UNKNOWN = "<unk>"  # row 0 of the embedding: every word outside the vocabulary
HOW_TO_MAKE = "make_tiny_text_encoder(texts) then save_tiny_text_encoder(encoder, FILE) (nit_lightning/data/tinytext.py)"


@dataclass
class TinyTextConfig:
    """Width, words per prompt, transformer layers and heads, and the seed of the random weights."""

    dim: int = 64
    max_length: int = 16  # words per prompt; longer prompts are truncated and counted
    layers: int = 1
    heads: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.max_length < 1 or self.layers < 0 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"tinytext config {self} needs dim, max_length, heads >= 1, layers >= 0 and heads "
                             "dividing dim")


def prompt_words(text: str) -> list[str]:
    """The tokenizer: lower-case runs of letters and digits ("A red, small ring." -> a, red, small, ring)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def vocabulary_of(texts: Iterable[str]) -> list[str]:
    """Sorted distinct words of `texts`: the same texts give the same vocabulary in any order."""
    return sorted({word for text in texts for word in prompt_words(text)})


class TinyTextNet(nn.Module):
    """word ids (B, L) -> hidden states (B, L, dim): embedding + position, then pre-norm transformer layers."""

    def __init__(self, config: TinyTextConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size + 1, config.dim)  # + the unknown word at row 0
        self.pos = nn.Parameter(torch.zeros(config.max_length, config.dim))
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.layers)])

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids_BL) + self.pos[: ids_BL.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return x


class TinyTextEncoder(TextEncoder):
    """The `tinytext` encoder: each distinct prompt is encoded alone (no padding, independent of its batch)."""

    kind = "tinytext"

    def __init__(self, net: TinyTextNet, vocabulary: list[str], *, path: str | None = None,
                 sha256: str | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if len(vocabulary) + 1 != net.embed.num_embeddings:
            raise ValueError(f"vocabulary of {len(vocabulary)} words does not fit an embedding of "
                             f"{net.embed.num_embeddings} rows (words + {UNKNOWN})")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.vocabulary = list(vocabulary)
        self.index = {word: i + 1 for i, word in enumerate(self.vocabulary)}
        self.dim, self.max_length = net.config.dim, net.config.max_length
        self.path, self.sha256 = path, sha256
        self.unknown_total = 0

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> EncodedPrompts:
        prompts = self._check_prompts(prompts)
        states: dict[str, torch.Tensor] = {}
        truncated = unknown = 0
        unknown_examples: list[str] = []
        for prompt in prompts:
            words = prompt_words(prompt)
            truncated += len(words) > self.max_length
            words = words[: self.max_length]
            missing = [w for w in words if w not in self.index]
            unknown += bool(missing)
            unknown_examples += missing[:1]
            if prompt not in states:
                ids = torch.tensor([[self.index.get(w, 0) for w in words]], dtype=torch.long,
                                   device=self.device)
                states[prompt] = self.net(ids)[0] if words else torch.zeros(0, self.dim, device=self.device)
        self._count_truncated(truncated, len(prompts))
        if unknown:
            self.unknown_total += unknown
            log.warning(
                "%d of %d prompts have words outside the tinytext vocabulary of %d words (e.g. %r); they are encoded "
                "as %s", unknown, len(prompts), len(self.vocabulary), unknown_examples[0], UNKNOWN)
        parts = [states[p] for p in prompts]
        tokens = torch.cat(parts) if parts else torch.zeros(0, self.dim, device=self.device)
        lengths = torch.tensor([part.shape[0] for part in parts], dtype=torch.long)
        return EncodedPrompts(tokens.float(), lengths, truncated=truncated, unknown=unknown)

    def describe(self) -> dict[str, Any]:
        if self.path is None or self.sha256 is None:
            raise ValueError("this tinytext encoder was never saved: save_tiny_text_encoder(encoder, FILE) first, so "
                             "that what it encoded can be traced to a file")
        return {"type": "tinytext", "path": self.path, "sha256": self.sha256, "dim": self.dim,
                "max_length": self.max_length, "vocab_size": len(self.vocabulary)}


def make_tiny_text_encoder(texts: Iterable[str], config: TinyTextConfig | None = None) -> TinyTextEncoder:
    """A random encoder whose vocabulary is every word of `texts`; the same texts and config give the same weights."""
    config = config or TinyTextConfig()
    vocabulary = vocabulary_of(texts)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(config.seed)
        net = TinyTextNet(config, len(vocabulary))
        nn.init.normal_(net.embed.weight, std=1.0)
        nn.init.normal_(net.pos, std=0.3)  # position matters less than which word it is
    return TinyTextEncoder(net, vocabulary)


def save_tiny_text_encoder(encoder: TinyTextEncoder, out: str | Path) -> str:
    """Write the encoder (atomic); it then describes itself by this file and its sha256, which is returned."""
    save_payload(out, {"kind": KIND, "version": FORMAT_VERSION, "config": asdict(encoder.net.config),
                       "vocabulary": encoder.vocabulary,
                       "state_dict": {k: v.cpu() for k, v in encoder.net.state_dict().items()}})
    encoder.path, encoder.sha256 = str(out), file_sha256(out)
    return encoder.sha256


def load_tiny_text_encoder(path: str | Path, device: str | torch.device = "cpu") -> TinyTextEncoder:
    """The encoder written by `save_tiny_text_encoder`, strict (its weights must match its config and vocabulary)."""
    payload = load_payload(path, kind=KIND, version_key="version", version=FORMAT_VERSION, what="tinytext encoder",
                           how_to_make=HOW_TO_MAKE)
    net = TinyTextNet(TinyTextConfig(**payload["config"]), len(payload["vocabulary"]))
    try:
        net.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{str(path)!r} is not a valid tinytext encoder (weights do not match its config: {first})") from error
    return TinyTextEncoder(net, payload["vocabulary"], path=str(path), sha256=file_sha256(path), device=device)
