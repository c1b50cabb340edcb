"""A pipeline = a network ready to sample + the codec that decodes its latents + where they came from.

`load_pipeline` reads a Lightning checkpoint (EMA weights by default) or official safetensors; `Pipeline.model_fn`
is the packed model_fn the samplers call; `Pipeline.decode` turns packed tokens into uint8 images. A NiT-T2I
checkpoint (conditioning "text") also brings its frozen text encoder: `Pipeline.encode_prompts`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nit_lightning.data.codecs import Codec, check_same_codec, resolve_codec
from nit_lightning.data.text_encoders import TextEncoder, text_encoder_from_description
from nit_lightning.generation.settings import PRECISIONS
from nit_lightning.models import NiT, NiTConfig, NiTT2I, NiTT2IConfig, load_official_checkpoint
from nit_lightning.models.official import config_from_official
from nit_lightning.models.patching import unpack_latents
from nit_lightning.models.text import PackedText
from nit_lightning.records.checkpoint import CheckpointMeta, ema_weights
from nit_lightning.records.names import DTYPES, WEIGHTS_DOCS, check_dtype_name

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """A network ready to sample (eval, no grad), the codec that decodes its latents, and where they came from."""

    net: NiT | NiTT2I
    codec: Codec
    meta: dict[str, Any] = field(default_factory=dict)  # how it was loaded: source, weights, weights_sha256, codec
    record: CheckpointMeta | None = None  # what the checkpoint says about itself; a net built in memory: derived
    text_encoder: TextEncoder | None = None  # NiT-T2I: the frozen encoder of the prompts

    def __post_init__(self) -> None:
        text = isinstance(self.net, NiTT2I)
        if text and self.text_encoder is None:
            raise ValueError("a NiT-T2I pipeline needs the text encoder it was trained with")
        if self.record is None:
            self.record = CheckpointMeta(net_config=dataclasses.asdict(self.net.config), codec=self.codec.describe(),
                                         patch_size=int(self.net.config.patch_size),
                                         conditioning="text" if text else "class",
                                         text_encoder=self.text_encoder.describe() if text else None)

    @property
    def conditioning(self) -> str:
        """"class" (labels) or "text" (prompts)."""
        return "text" if isinstance(self.net, NiTT2I) else "class"

    @property
    def null_class(self) -> int | None:
        return getattr(self.net, "null_class", None)

    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> PackedText:
        """The caption tokens of `prompts` (in order) from the frozen text encoder, on `device`."""
        if self.text_encoder is None:
            raise ValueError("this checkpoint is class-conditional (NiT): it takes class labels, not prompts")
        with torch.no_grad():
            packed = self.text_encoder.encode(list(prompts)).packed()
        return packed.to(device if device is not None else next(self.net.parameters()).device)

    @property
    def size_multiple(self) -> int:
        """Pixel sides must be multiples of codec factor × patch size (32 × 1 for DC-AE f32 and NiT)."""
        return int(self.codec.factor) * int(self.net.config.patch_size)

    @property
    def token_dim(self) -> int:
        return int(self.net.config.token_dim)

    def model_fn(self, precision: str = "float32", rope_interp_scale: float | None = None) -> "NetModelFn":
        return NetModelFn(self.net, precision, rope_interp_scale)

    @torch.no_grad()
    def decode(self, x_ND: torch.Tensor, hw: torch.Tensor, max_batch: int = 16) -> list[torch.Tensor]:
        """Packed tokens (N, C·p·p) + grids (B, 2) -> uint8 images (3, H, W) on CPU; decoded per size, max_batch at once.

        max_batch bounds decoder memory: a 16384-token pack of 256² images with CFG holds 128 images.
        """
        cfg = self.net.config
        latents = unpack_latents(x_ND.float(), hw.cpu(), cfg.in_channels, cfg.patch_size)
        out: list[torch.Tensor | None] = [None] * len(latents)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, z in enumerate(latents):
            groups.setdefault(tuple(z.shape), []).append(i)
        for same_size in groups.values():
            for start in range(0, len(same_size), max_batch):
                indices = same_size[start : start + max_batch]
                images = self.codec.decode(torch.stack([latents[i] for i in indices]))
                for i, image in zip(indices, to_uint8(images).cpu()):
                    out[i] = image
        return out  # type: ignore[return-value]


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the state dict: which model made a sample set.

    It names the weights, not the file: re-saving the same weights keeps it, another step or run changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 by uint8 = clamp(round((x + 1) · 127.5), 0, 255), torch.round = half to even."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class NetModelFn:
    """model_fn(x, t, y, hw) over a NiT or NiT-T2I: reuses the packed metadata (RoPE tables, cu_seqlens, caption
    offsets) per hw tensor (and caption object), optional autocast.

    The cache is keyed by the identity of `hw` and of a PackedText condition (the sampler passes the same objects
    every step, and the doubled ones under CFG), so no host read happens per step; use one NetModelFn per pack.
    """

    def __init__(self, net: NiT | NiTT2I, precision: str = "float32", rope_interp_scale: float | None = None) -> None:
        check_dtype_name(precision, PRECISIONS, "precision")
        self.net, self.precision, self.rope_interp_scale = net, precision, rope_interp_scale
        self._cache: list[tuple[torch.Tensor, int, Any, Any]] = []  # (hw, N, text, meta); 2 live: cond and CFG

    def _meta(self, hw: torch.Tensor, num_tokens: int, y: Any = None) -> Any:
        text = y if isinstance(y, PackedText) else None
        for known, n, known_text, meta in self._cache:
            if known is hw and n == num_tokens and known_text is text:
                return meta
        if text is None:
            meta = self.net.build_meta(hw, num_tokens, rope_interp_scale=self.rope_interp_scale)
        else:
            meta = self.net.build_meta(hw, num_tokens, text.lengths, text.tokens.shape[0],
                                       rope_interp_scale=self.rope_interp_scale)
        self._cache = self._cache[-3:] + [(hw, num_tokens, text, meta)]
        return meta

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | PackedText, hw: torch.Tensor) -> torch.Tensor:
        meta = self._meta(hw, x.shape[0], y)
        ctx = (
            torch.autocast(x.device.type, dtype=DTYPES[self.precision])
            if self.precision != "float32" else contextlib.nullcontext()
        )
        with ctx:
            v = self.net(x, t, y, hw, meta=meta)
        return v.to(x.dtype)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    others = sorted(k for k in state if not k.startswith(prefix))
    return kept, others


def _load_lightning(path: Path, use_ema: bool, rope_layout: str | None
                    ) -> tuple[NiT | NiTT2I, CheckpointMeta, dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled objects: say so instead of unpickling arbitrary code
        raise ValueError(
            f"could not read {path} with torch.load(weights_only=True): {type(error).__name__}: {error}. "
            "Checkpoints must hold only tensors and plain Python values"
        ) from error
    record = CheckpointMeta.from_checkpoint(ckpt if isinstance(ckpt, dict) else {}, path)
    config = net_config_of(record, rope_layout, path)
    net = NiTT2I(config) if record.conditioning == "text" else NiT(config)
    ema = ema_weights(ckpt)
    if use_ema and ema is not None:
        state, weights, ignored = ema, "ema (checkpoint['ema_state_dict'])", []
    else:
        if "state_dict" not in ckpt:
            raise ValueError(f"{path} has neither 'ema_state_dict' (or use_ema=False) nor 'state_dict'")
        state, ignored = _strip_prefix(ckpt["state_dict"], "net.")
        why = "use_ema=False" if not use_ema else "no ema_state_dict in the checkpoint"
        weights = f"live (state_dict 'net.*', {why})"
        if use_ema:
            log.warning("%s has no EMA weights: sampling with the live weights", path)
    net.load_state_dict(state, strict=True)
    loaded = {"source": str(path), "weights": weights, "step": record.step, "ignored_keys": len(ignored)}
    log.info("loaded %s: %s weights, step %s%s", path, weights, record.step,
             f", ignored {len(ignored)} non-net keys (loss/projector state)" if ignored else "")
    return net, record, loaded


def net_config_of(record: CheckpointMeta, rope_layout: str | None, path: Path) -> NiTConfig | NiTT2IConfig:
    """The recorded network config (with a rope_layout override, said aloud); an unknown key is one clear error."""
    kind = NiTT2IConfig if record.conditioning == "text" else NiTConfig
    config = dict(record.net_config)
    if rope_layout is not None and rope_layout != config.get("rope_layout"):
        log.warning("rope_layout %r overrides the checkpoint's %r", rope_layout, config.get("rope_layout"))
        config["rope_layout"] = rope_layout
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise ValueError(f"{path}: the recorded network config has keys this code does not know: {unknown}; it was "
                         "written by another nit-lightning version")
    return kind(**config)


def _load_official(path: Path, rope_layout: str | None) -> tuple[NiT, CheckpointMeta, dict[str, Any]]:
    layout = rope_layout or "reference"
    if layout != "reference":
        log.warning("official checkpoints were trained with rope_layout 'reference'; using %r as asked", layout)
    # The architecture (depth, width, heads, LoRA rank, projector) is read off the file's shapes, so any official
    # size loads, and REPA projector weights load into the net instead of being skipped.
    net = NiT(config_from_official(path, rope_layout=layout))
    report = load_official_checkpoint(net, path)
    log.info("loaded official %s", report.summary())
    loaded = {"source": str(path), "weights": "official safetensors (EMA)", "report": report.summary()}
    return net, CheckpointMeta.for_official(dataclasses.asdict(net.config)), loaded


def load_pipeline(
    path: str | Path,
    *,
    use_ema: bool = True,
    rope_layout: str | None = None,
    device: str | torch.device = "cpu",
    codec: Codec | str | dict | None = None,
) -> Pipeline:
    """Lightning `.ckpt` (EMA weights unless use_ema=False; strict) or an official `.safetensors` (needs `codec`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a Lightning .ckpt or an official .safetensors "
                                f"(the official NiT weights: {WEIGHTS_DOCS})")
    if path.suffix == ".safetensors":
        if codec is None:
            raise ValueError(
                f"{path} is an official checkpoint, which records no codec: pass the DC-AE it was trained with, "
                f"--codec dcae:/path/to/dc-ae-f32c32-sana-1.1-diffusers (local weights; {WEIGHTS_DOCS})"
            )
        net, record, loaded = _load_official(path, rope_layout)
    else:
        net, record, loaded = _load_lightning(path, use_ema, rope_layout)
    the_codec, codec_from = resolve_codec(
        codec, record.codec, device=str(device), fallback_name="checkpoint nit_meta",
        missing="the checkpoint records no codec (nit_meta['codec'] is None); pass one, e.g. --codec dcae:/path/to/dc-ae "
        "or --codec pixel:8",
    )
    if the_codec.latent_channels != net.config.in_channels:
        raise ValueError(
            f"codec {the_codec.describe()} makes {the_codec.latent_channels}-channel latents but the net expects "
            f"in_channels={net.config.in_channels}; pass the codec the model was trained with"
        )
    if codec is not None:
        check_same_codec(the_codec, record.codec, str(path))
    text_encoder = _text_encoder_of(record, path, device)
    net = net.to(device).eval().requires_grad_(False)
    loaded.update(codec=the_codec.describe(), codec_from=codec_from, weights_sha256=weights_digest(net))
    if text_encoder is not None:
        loaded["text_encoder"] = text_encoder.describe()
    return Pipeline(net=net, codec=the_codec, record=record, meta=loaded, text_encoder=text_encoder)


def _text_encoder_of(record: CheckpointMeta, path: Path, device: str | torch.device) -> TextEncoder | None:
    """NiT-T2I: the text encoder the checkpoint records (located beside a moved run folder, sha256 checked)."""
    if record.conditioning != "text":
        return None
    if record.text_encoder is None:
        raise ValueError(f"{path} is a NiT-T2I checkpoint but records no text encoder (nit_meta['text_encoder'])")
    return text_encoder_from_description(record.text_encoder, device=device)
