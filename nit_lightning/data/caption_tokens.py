"""Caption token counts (NiT-T2I packing): how many tokens a text encoder makes of each caption, from its tokenizer
alone, so that `prepare --captions ... --text-encoder SPEC` can store them in index.json without running the network.

A count is what the encoder's `encode` would return as the caption's length: tinytext, its words capped at
max_length; hf, the tokenizer's ids with special tokens (Gemma's BOS) capped at max_length. The packer then charges
for them (data/caption_packing.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nit_lightning.data.text_encoders import TEXT_ENCODER_SPEC_HELP, check_hf_folder, hf_folder_sha256, hf_max_length

log = logging.getLogger(__name__)

TEXT_ENCODER_FLAG = "--text-encoder"
HF_BATCH = 1024  # captions per tokenizer call: a fast tokenizer's batch call is parallel, and SAM has millions


class CaptionCounter:
    """`count(captions)` -> tokens per caption under one encoder's tokenizer; `describe()` names that encoder."""

    kind: str
    max_length: int

    def __init__(self, description: dict[str, Any]) -> None:
        self.description = description
        self.max_length = int(description["max_length"])

    def lengths(self, captions: list[str]) -> list[int]:
        """Uncapped token counts."""
        raise NotImplementedError

    def count(self, captions: list[str]) -> list[int]:
        """Token counts capped at max_length, as the encoder truncates; the capped captions are logged, never silent."""
        full = self.lengths(captions)
        long = sum(n > self.max_length for n in full)
        if long:
            log.warning("%d of %d captions are longer than %s's %d tokens: counted as %d (the encoder truncates them "
                        "to it)", long, len(full), self.kind, self.max_length, self.max_length)
        return [min(n, self.max_length) for n in full]

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


class TinyTextCounter(CaptionCounter):
    """tinytext: lower-case runs of letters and digits (its `prompt_words`)."""

    kind = "tinytext"

    def __init__(self, path: str) -> None:
        from nit_lightning.data.tinytext import load_tiny_text_encoder, prompt_words

        # The file is small (a vocabulary and a few layers) and its description needs its checked sha256.
        super().__init__(load_tiny_text_encoder(path).describe())
        self._words = prompt_words

    def lengths(self, captions: list[str]) -> list[int]:
        return [len(self._words(caption)) for caption in captions]


class HFTokenCounter(CaptionCounter):
    """hf: the folder's tokenizer and config only (no weights loaded; they are hashed for the description)."""

    kind = "hf"

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoConfig, AutoTokenizer
        except ImportError as error:
            raise ValueError(f"{TEXT_ENCODER_FLAG} hf:{path} needs the transformers package, which is not installed "
                             f"here ({error}); pip install 'transformers>=4.56'") from error
        folder = Path(path).expanduser()
        check_hf_folder(folder, flag=f"{TEXT_ENCODER_FLAG} hf:PATH")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - a bad file raises OSError, ValueError, KeyError...
            first = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:300]
            raise ValueError(f"text encoder folder {path!r} could not be read by transformers: "
                             f"{type(error).__name__}: {first}") from error
        model_type = str(getattr(config, "model_type", "?"))
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        # The same description as HFTextEncoder.describe() but its compute dtype, which counting does not use.
        super().__init__({"type": "hf", "path": str(path), "sha256": hf_folder_sha256(folder),
                          "dim": int(config.hidden_size), "max_length": hf_max_length(config, None, str(path)),
                          "model_type": model_type})

    def lengths(self, captions: list[str]) -> list[int]:
        counts: list[int] = []
        for start in range(0, len(captions), HF_BATCH):
            ids = self.tokenizer(captions[start:start + HF_BATCH], truncation=False)["input_ids"]
            counts += [len(row) for row in ids]
        return counts


def caption_counter_from_spec(spec: str) -> CaptionCounter:
    """'hf:PATH' or 'tinytext:PATH', as the model's `text_encoder`; one line for anything else."""
    kind, _, arg = str(spec).partition(":")
    if kind not in ("hf", "tinytext") or not arg:
        raise ValueError(f"{TEXT_ENCODER_FLAG} {spec!r} is not {TEXT_ENCODER_SPEC_HELP}")
    return HFTokenCounter(arg) if kind == "hf" else TinyTextCounter(arg)


def caption_counter_for(spec: str | None, captions: str | None) -> CaptionCounter | None:
    """prepare's counter: None without --text-encoder; --text-encoder without --captions is one line."""
    if spec is None:
        return None
    if captions is None:
        raise ValueError(f"{TEXT_ENCODER_FLAG} {spec} counts caption tokens: it is for captioned folders, pass "
                         "--captions beside or --captions MANIFEST.jsonl too")
    return caption_counter_from_spec(spec)


def count_captions(counter: CaptionCounter | None, captions: list[str] | None, indices: list[int]
                   ) -> dict[int, int] | None:
    """{listing index: caption tokens} of the images this rank encodes (None without a counter)."""
    if counter is None or captions is None:
        return None
    return dict(zip(indices, counter.count([captions[i] for i in indices])))


def caption_sidecar(counts: dict[int, int] | None, keys: list[str]) -> dict[str, Any]:
    """The sidecar's `caption_tokens`, aligned with its keys and lengths (a sample's key is its listing index)."""
    return {} if counts is None else {"caption_tokens": [counts[int(key)] for key in keys]}
