"""CLIP score of generated images against their prompts, from a local CLIP model folder (never downloads).

One image i with prompt c_i scores s_i = max(cos(E_I(i), E_T(c_i)), 0), E = CLIP's projected embeddings
(`get_image_features` / `get_text_features`). Reported: mean s (the paper's form, Tab. 6: "CLIP 0.345"), 100 · mean s
(torchmetrics' CLIPScore form: 34.5), the standard error std(s, ddof=1) / sqrt(n), and n.
Images of any size go through CLIP's own image processor (its short-side resize and centre crop to the model's input,
224² for OpenAI's ViT-L/14), one image at a time inside a batch, so native sizes need no common size. Prompts go through
its tokenizer, cut to the text model's positions (77 for OpenAI's CLIP) with the end-of-text token kept (as OpenAI's
`clip.tokenize(truncate=True)`; torchmetrics slices the ids and so drops it); cut prompts are counted and logged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from nit_lightning.data.text_encoders import check_hf_folder, hf_folder_sha256

log = logging.getLogger(__name__)

CLIP_EXAMPLE = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIP; the paper does not name its CLIP model
# transformers ≥ 5 saves the image processor into processor_config.json; the hub's CLIP folders ship the older name.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass
class ClipScores:
    """Per-image scores s_i = max(cos, 0) in the images' order, and how many prompts were cut to the text limit."""

    scores: np.ndarray  # (n,) float64
    truncated: int = 0

    def summary(self) -> dict[str, Any]:
        n = int(self.scores.size)
        if n == 0:
            raise ValueError("no images to score: the CLIP score of an empty set is undefined")
        mean = float(self.scores.mean())
        stderr = float(self.scores.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        return {"clip_score": mean, "clip_score_stderr": stderr, "clip_score_x100": 100.0 * mean,
                "clip_score_n": n, "clip_prompts_truncated": int(self.truncated)}


def _embedding(output: Any) -> torch.Tensor:
    """transformers < 5 returns the projected embeddings; ≥ 5 a model output holding them as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A local transformers CLIP folder (CLIPModel + its tokenizer and image processor), frozen, float32."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"CLIP batch size must be >= 1, got {batch_size}")
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as error:
            raise ValueError(f"the CLIP score needs the transformers package, which is not installed here ({error}); "
                             "pip install 'transformers>=4.56'") from error
        self.path, self.device, self.batch_size = str(path), torch.device(device), int(batch_size)
        folder = Path(self.path).expanduser()
        check_hf_folder(folder, what="CLIP model", flag="--clip-model DIR", example=CLIP_EXAMPLE,
                        extra=(IMAGE_PROCESSOR_FILES,))
        try:
            model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - a bad file raises OSError, ValueError, KeyError, SafetensorError...
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ValueError(f"CLIP model folder {self.path!r} could not be loaded by transformers as a CLIPModel "
                             f"with its processor: {type(error).__name__}: {' '.join(lines[:2])[:300]}") from error
        missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
        if missing:  # a non-strict load would score with random weights
            raise ValueError(f"CLIP model folder {self.path!r} lacks weights for {len(missing)} parameters "
                             f"(e.g. {missing[0]}): its weight files do not match its config.json")
        self.model = model.float().to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        if self.tokenizer.pad_token is None:  # padded positions are masked; CLIP pools at the end-of-text token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """Digest of the folder's config, tokenizer, image processor and weight files (computed once)."""
        if self._sha256 is None:
            self._sha256 = hf_folder_sha256(Path(self.path).expanduser(), IMAGE_PROCESSOR_FILES)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """What scored (recorded beside the numbers): the folder, its digest, the model's input size and text limit."""
        config = self.model.config
        return {"path": self.path, "sha256": self.sha256, "model_type": str(config.model_type),
                "projection_dim": int(config.projection_dim), "image_size": int(config.vision_config.image_size),
                "max_length": self.max_length}

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, P) unit-norm embeddings of uint8 (H, W, 3) images of any sizes."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        features = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device))).double()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """(B, P) unit-norm embeddings of the prompts, and how many were cut to max_length tokens."""
        full = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        truncated = sum(len(ids) > self.max_length for ids in full)
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        features = _embedding(self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                                           attention_mask=batch["attention_mask"].to(self.device)))
        features = features.double()
        return features / features.norm(dim=-1, keepdim=True), truncated

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> ClipScores:
        """s_i = max(cos(E_I(image_i), E_T(prompt_i)), 0) for every pair, in batches of batch_size."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: the CLIP score pairs them one to one")
        return self.score_batches([(images, prompts)])

    def score_batches(self, pairs: Iterable[tuple[Sequence[np.ndarray], Sequence[str]]]) -> ClipScores:
        """Score (images, prompts) batches of any length (a sample folder read batch by batch), batch_size at a time;
        prompts cut to max_length are counted and logged once."""
        parts, truncated, total = [], 0, 0
        for images, prompts in pairs:
            if len(images) != len(prompts):
                raise ValueError(f"{len(images)} images but {len(prompts)} prompts: the CLIP score pairs them one to "
                                 "one")
            for start in range(0, len(images), self.batch_size):
                image_emb = self.image_embeddings(images[start:start + self.batch_size])
                text_emb, cut = self.text_embeddings(prompts[start:start + self.batch_size])
                parts.append((image_emb * text_emb).sum(-1).clamp(min=0).cpu().numpy())
                truncated += cut
            total += len(prompts)
        if truncated:
            log.warning("CLIP score: %d of %d prompts were longer than CLIP's %d tokens and were truncated to it "
                        "(end-of-text kept)", truncated, total, self.max_length)
        return ClipScores(np.concatenate(parts) if parts else np.zeros(0), truncated)


def score_sample_folder(folder: str | Path, scorer: ClipScorer, *, batch_size: int = 64) -> dict[str, Any]:
    """CLIP score of a sample folder against its prompts.jsonl: the summary and the CLIP model that made it."""
    from nit_lightning.evaluation.sample_prompts import iter_prompt_batches, read_sample_prompts

    records = read_sample_prompts(folder)
    result = scorer.score_batches(iter_prompt_batches(records, batch_size)).summary()
    return {**result, "clip_model": scorer.describe()}
