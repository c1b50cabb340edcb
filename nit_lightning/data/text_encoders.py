"""Text encoders of NiT-T2I: prompts -> packed hidden states (the caption tokens), one interface for every kind.

`hf:PATH`: a local transformers model folder (the paper's Gemma3-1B-it, or any causal or encoder model with hidden
states); never downloads. `tinytext:PATH`: the tiny CPU encoder of data/tinytext.py. Both are frozen feature
extractors: `encode(prompts)` returns every prompt's last hidden states without padding, `describe()` what rebuilds
the encoder (and checks it is the same one), like the codecs' `describe()`.

Prompts longer than the encoder's limit are cut to it and counted: in the return value, in `truncated_total`, and in a
warning in the log, never silently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nit_lightning.models.text import PackedText

log = logging.getLogger(__name__)

TEXT_ENCODER_SPEC_HELP = ("hf:PATH (a local transformers model folder, e.g. Gemma3-1B-it) or tinytext:PATH (a tiny "
                          "encoder file from data/tinytext.py)")
HF_DEFAULT_MAX_LENGTH = 300  # tokens per prompt; the paper gives none (SANA reads 300 Gemma tokens); a config value
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")


@dataclass
class EncodedPrompts:
    """B prompts encoded: tokens (M, E) float32 = every prompt's hidden states in order, lengths (B,) long."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    truncated: int = 0  # prompts cut to the encoder's max_length
    unknown: int = 0  # prompts with words outside a word-level vocabulary (tinytext), encoded as <unk>

    def packed(self) -> PackedText:
        return PackedText(self.tokens, self.lengths)


class TextEncoder:
    """Protocol shared by every text encoder: `dim` (E), `max_length` (tokens per prompt), `encode`, `describe`."""

    kind: str
    dim: int
    max_length: int

    def __init__(self) -> None:
        self.prompts_total = 0
        self.truncated_total = 0

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _check_prompts(self, prompts: list[str]) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode takes a list of prompt strings")
        return list(prompts)

    def _count_truncated(self, truncated: int, total: int) -> None:
        """Count and log prompts cut to max_length (never silent)."""
        self.prompts_total += total
        self.truncated_total += truncated
        if truncated:
            log.warning("%d of %d prompts were longer than %s's %d tokens and were truncated to it (%d of %d so far)",
                        truncated, total, self.kind, self.max_length, self.truncated_total, self.prompts_total)


def check_hf_folder(path: Path, *, what: str = "text encoder", flag: str = "hf:PATH",
                    example: str = "google/gemma-3-1b-it", extra: tuple[tuple[str, ...], ...] = ()) -> None:
    """One line naming what a transformers model folder lacks (`extra`: more files, one of each tuple, e.g. CLIP's
    image processor config); shared by every loader of local transformers folders (text encoders, CLIP score)."""
    needs = ("a transformers model folder (config.json, tokenizer files, weights: *.safetensors or "
             "pytorch_model*.bin); this suite never downloads: copy the model there first (e.g. `huggingface-cli download "
             f"{example} --local-dir DIR` on a machine with internet)")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} not found; {flag} needs {needs}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {str(path)!r} has no config.json; {flag} needs {needs}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{what} folder {str(path)!r} has no tokenizer (none of "
                                f"{', '.join(_TOKENIZER_FILES)}); {flag} needs {needs}")
    for names in extra:
        if not any((path / name).is_file() for name in names):
            raise FileNotFoundError(f"{what} folder {str(path)!r} has no {' or '.join(names)}; {flag} needs {needs}")
    if not weight_files(path):
        raise FileNotFoundError(f"{what} folder {str(path)!r} has no weights (*.safetensors or "
                                f"pytorch_model*.bin); {flag} needs {needs}")


def weight_files(path: Path) -> list[str]:
    """The weight files of a transformers folder, sorted by name."""
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and (p.suffix == ".safetensors" or (p.name.startswith("pytorch_model") and
                                                                     p.suffix == ".bin")))


def hf_folder_sha256(folder: Path, extra: tuple[str, ...] = ()) -> str:
    """Digest of a transformers folder's config, tokenizer, `extra` and weight files (those present)."""
    from nit_lightning.data.saved import files_sha256

    names = ["config.json", *[n for n in _TOKENIZER_FILES + _TOKENIZER_SIDE_FILES + extra if (folder / n).is_file()],
             *weight_files(folder)]
    return files_sha256(folder, names)


def hf_max_length(config: Any, max_length: int | None, path: str) -> int:
    """Tokens per prompt: `max_length`, else HF_DEFAULT_MAX_LENGTH, never more than the model's positions (shared with
    the caption counter of data/caption_tokens.py, so that counted and encoded lengths agree)."""
    limit = getattr(config, "max_position_embeddings", None) or HF_DEFAULT_MAX_LENGTH
    if max_length is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} is more than text encoder {path!r} can read ({limit} positions)")
    return int(max_length or min(HF_DEFAULT_MAX_LENGTH, limit))


class HFTextEncoder(TextEncoder):
    """A local transformers model: last hidden states of the prompt's tokens (with the tokenizer's special tokens)."""

    kind = "hf"

    def __init__(self, path: str | Path, *, max_length: int | None = None, dtype: str = "float32",
                 device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        super().__init__()
        if dtype not in HF_DTYPES:
            raise ValueError(f"text encoder dtype {dtype!r} is not one of {sorted(HF_DTYPES)}")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as error:
            raise ValueError(f"text encoder hf:{path} needs the transformers package, which is not installed here "
                             f"({error}); pip install 'transformers>=4.56'") from error
        self.path, self.dtype_name, self.device = str(path), dtype, torch.device(device)
        self.batch_size = int(batch_size)
        folder = Path(self.path).expanduser()
        check_hf_folder(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model, info = AutoModel.from_pretrained(folder, local_files_only=True, dtype=HF_DTYPES[dtype],
                                                    output_loading_info=True)
        except Exception as error:  # noqa: BLE001 - a bad file raises OSError, ValueError, KeyError, SafetensorError...
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ValueError(f"text encoder folder {self.path!r} could not be loaded by transformers: "
                             f"{type(error).__name__}: {' '.join(lines[:2])[:300]}") from error
        missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
        if missing:  # a non-strict load would run the encoder with random weights
            raise ValueError(f"text encoder folder {self.path!r} lacks weights for {len(missing)} parameters "
                             f"(e.g. {missing[0]}): its weight files do not match its config.json")
        if info.get("unexpected_keys"):
            log.info("text encoder %s: %d weights not used by %s (e.g. %s)", self.path, len(info["unexpected_keys"]),
                     type(model).__name__, sorted(info["unexpected_keys"])[0])
        self.model = model.to(self.device).eval().requires_grad_(False)
        config = self.model.config
        self.model_type = str(getattr(config, "model_type", type(model).__name__))
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: its text part
        self.dim = int(config.hidden_size)
        self.max_length = hf_max_length(config, max_length, self.path)
        # Right padding: a causal model numbers positions from the left, so left padding would shift every real token.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:  # padded positions are masked out and dropped; any real token will do
            fill = self.tokenizer.eos_token or self.tokenizer.unk_token or self.tokenizer.bos_token
            if fill is None:
                raise ValueError(f"the tokenizer of {self.path!r} has no pad, eos, unk or bos token to pad with")
            self.tokenizer.pad_token = fill
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """Digest of the folder's config, tokenizer and weight files (computed once: weights can be gigabytes)."""
        if self._sha256 is None:
            self._sha256 = hf_folder_sha256(Path(self.path).expanduser())
        return self._sha256

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> EncodedPrompts:
        prompts = self._check_prompts(prompts)
        if not prompts:
            return EncodedPrompts(torch.zeros(0, self.dim, device=self.device), torch.zeros(0, dtype=torch.long))
        full = self.tokenizer(prompts, truncation=False)["input_ids"]
        truncated = sum(len(ids) > self.max_length for ids in full)
        tokens, lengths = [], []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            mask = batch["attention_mask"].to(self.device)
            hidden = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
            tokens.append(hidden[mask.bool()].float())  # (Σ L_i, E): real tokens only, prompt by prompt
            lengths.append(mask.sum(1).cpu())
        self._count_truncated(truncated, len(prompts))
        return EncodedPrompts(torch.cat(tokens), torch.cat(lengths).long(), truncated=truncated)

    def describe(self) -> dict[str, Any]:
        return {"type": "hf", "path": self.path, "sha256": self.sha256, "dim": self.dim, "max_length": self.max_length,
                "dtype": self.dtype_name, "model_type": self.model_type}


def text_encoder_from_spec(spec: str, *, max_length: int | None = None, dtype: str = "float32",
                           device: str | torch.device = "cpu") -> TextEncoder:
    """Command-line form: 'hf:/path/to/model-folder' or 'tinytext:/path/to/file.pt'."""
    kind, _, arg = str(spec).partition(":")
    if kind in ("hf", "tinytext") and not arg:
        raise ValueError(f"text encoder {spec!r} needs a path: {kind}:PATH")
    if kind == "hf":
        return HFTextEncoder(arg, max_length=max_length, dtype=dtype, device=device)
    if kind == "tinytext":
        from nit_lightning.data.tinytext import load_tiny_text_encoder

        if max_length is not None:
            raise ValueError("tinytext encoders keep the max_length they were made with; do not pass one")
        return load_tiny_text_encoder(arg, device=device)
    raise ValueError(f"text encoder {spec!r} is not {TEXT_ENCODER_SPEC_HELP}")


def text_encoder_from_description(description: dict[str, Any], device: str | torch.device = "cpu") -> TextEncoder:
    """Rebuild an encoder from `describe()` and check it is the same one (sha256 of its files)."""
    kind = description.get("type")
    if kind == "hf":
        encoder: TextEncoder = HFTextEncoder(description["path"], max_length=description.get("max_length"),
                                             dtype=description.get("dtype", "float32"), device=device)
    elif kind == "tinytext":
        from nit_lightning.data.tinytext import load_tiny_text_encoder

        encoder = load_tiny_text_encoder(description["path"], device=device)
    else:
        raise ValueError(f"unknown text encoder description {description!r}: expected type 'hf' or 'tinytext'")
    recorded = description.get("sha256")
    if recorded != encoder.sha256:
        raise ValueError(f"text encoder {kind}:{description['path']} has sha256 {encoder.sha256[:12]}…, but the caption "
                         f"tokens were made with {str(recorded)[:12]}…: the model changed since; restore those files "
                         "or encode the captions again with this one")
    return encoder
