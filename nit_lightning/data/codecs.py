"""Image <-> latent codecs: DC-AE (diffusers AutoencoderDC, local weights only), a lossless pixel codec and a tiny
learned autoencoder (data/tinyae.py) for CPU runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from nit_lightning.records import describe_differences, differences
from nit_lightning.records.names import WEIGHTS_DOCS

DEFAULT_DCAE_ID = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
CODEC_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODEC_SPEC_HELP = ("pixel:F (lossless space-to-depth, F pixels per side), dcae:PATH_OR_ID (DC-AE, local weights) or "
                   "tinyae:PATH (a tiny autoencoder file from `python -m nit_lightning tinyae`)")


class Codec:
    """Protocol shared by every codec: images (B, 3, H, W) in [-1, 1] <-> latents (B, C, H/f, W/f)."""

    factor: int
    latent_channels: int

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def check_size(self, hw: tuple[int, int]) -> None:
        """Sides must be multiples of the factor; the error says which side and what to do."""
        h, w = int(hw[0]), int(hw[1])
        if h <= 0 or w <= 0 or h % self.factor or w % self.factor:
            raise ValueError(
                f"image {h}×{w} is not a multiple of the codec factor {self.factor} on both sides; "
                f"resize it with `prepare --mode native` (or crop it) first"
            )

    def encode_list(self, images: list[torch.Tensor], max_batch: int = 16) -> list[torch.Tensor]:
        """list of (3, H, W) -> list of (C, H/f, W/f); images of equal size are encoded together, max_batch at a time."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i} must be (3, H, W), got {tuple(image.shape)}")
            groups.setdefault(tuple(image.shape), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), max_batch):
                chunk = indices[start : start + max_batch]
                latents = self.encode(torch.stack([images[i] for i in chunk]))
                for i, latent in zip(chunk, latents):
                    out[i] = latent
        return out  # type: ignore[return-value]


class PixelCodec(Codec):
    """Lossless space-to-depth (pixel_unshuffle): f×f pixels of 3 channels -> one latent pixel of C = 3·f² channels."""

    def __init__(self, factor: int = 8):
        if int(factor) < 1:
            raise ValueError(f"pixel codec factor must be ≥ 1, got {factor}")
        self.factor = int(factor)
        self.latent_channels = 3 * self.factor**2

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        self.check_size(images_B3HW.shape[-2:])
        return F.pixel_unshuffle(images_B3HW.float(), self.factor)  # (B, 3·f², H/f, W/f), channels (3, f, f)

    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        if latents_BChw.shape[-3] != self.latent_channels:
            raise ValueError(f"pixel codec f={self.factor} needs C={self.latent_channels}, got {latents_BChw.shape[-3]}")
        return F.pixel_shuffle(latents_BChw.float(), self.factor)

    def describe(self) -> dict[str, Any]:
        return {"type": "pixel", "factor": self.factor, "latent_channels": self.latent_channels}


def _looks_like_repo_id(path_or_id: str) -> bool:
    """'owner/name' with no leading '/', '.', '~': a Hugging Face repo id rather than a path."""
    return path_or_id.count("/") == 1 and not path_or_id.startswith(("/", ".", "~"))


def _resolve_dcae_source(path_or_id: str) -> str:
    """A local directory, or a repo id that must already be in the local HF cache; otherwise a clear error."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return str(local)
    if not _looks_like_repo_id(path_or_id):
        raise FileNotFoundError(_missing_message(path_or_id, "no such directory"))
    return path_or_id


def _missing_message(path_or_id: str, why: str) -> str:
    repo_id = path_or_id if _looks_like_repo_id(path_or_id) else DEFAULT_DCAE_ID
    return (
        f"DC-AE model {path_or_id!r} not found locally ({why}). This suite never downloads weights at run time. "
        f"Put the diffusers-format model (config.json + diffusion_pytorch_model.safetensors) in a directory and pass "
        f"`--codec dcae:/that/dir`, or fetch it once on a machine with internet: `huggingface-cli download {repo_id}` "
        f"(it lands in the local HF cache, $HF_HOME or ~/.cache/huggingface, where `--codec dcae:{repo_id}` finds it). "
        f"Where to get it: {WEIGHTS_DOCS}"
    )


class DCAECodec(Codec):
    """DC-AE: latent = encoder(x).latent · scaling_factor (read from the model config); decode divides by it."""

    def __init__(self, path_or_id: str = DEFAULT_DCAE_ID, dtype: str = "float32", device: str | torch.device = "cpu"):
        if dtype not in CODEC_DTYPES:
            raise ValueError(f"codec dtype {dtype!r} is not one of {sorted(CODEC_DTYPES)}")
        from diffusers import AutoencoderDC

        self.path_or_id, self.dtype_name = str(path_or_id), dtype
        self.dtype, self.device = CODEC_DTYPES[dtype], torch.device(device)
        source = _resolve_dcae_source(self.path_or_id)
        try:
            model = AutoencoderDC.from_pretrained(
                source, local_files_only=True, torch_dtype=self.dtype, low_cpu_mem_usage=False  # accelerate is optional
            )
        except (OSError, ValueError) as error:  # diffusers raises OSError/EnvironmentError for a missing model
            raise FileNotFoundError(_missing_message(self.path_or_id, f"{type(error).__name__}: {error}")) from error
        self.model = model.to(self.device).eval().requires_grad_(False)
        config = self.model.config
        if "scaling_factor" not in config:
            raise ValueError(f"DC-AE config of {self.path_or_id!r} has no scaling_factor; cannot scale latents")
        self.scaling_factor = float(config["scaling_factor"])
        # Each encoder stage after the first halves the resolution: 6 stages -> f = 2^5 = 32 (f32c32).
        self.factor = 2 ** (len(config["encoder_block_out_channels"]) - 1)
        self.latent_channels = int(config["latent_channels"])

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        self.check_size(images_B3HW.shape[-2:])
        x = images_B3HW.to(self.device, self.dtype)
        return (self.model.encode(x).latent * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        if latents_BChw.shape[-3] != self.latent_channels:
            raise ValueError(f"DC-AE {self.path_or_id!r} needs C={self.latent_channels}, got {latents_BChw.shape[-3]}")
        z = latents_BChw.to(self.device, self.dtype) / self.scaling_factor
        return self.model.decode(z).sample.float()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "dcae",
            "path": self.path_or_id,
            "dtype": self.dtype_name,
            "factor": self.factor,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
        }


class TinyAECodec(Codec):
    """The tiny learned autoencoder of data/tinyae.py: latent = encoder(x) · scaling_factor (stored in the file)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from nit_lightning.data.saved import file_sha256
        from nit_lightning.data.tinyae import load_tinyae

        self.path = str(path)
        net, self.scaling_factor, _ = load_tinyae(self.path)
        self.sha256 = file_sha256(self.path)
        self.device = torch.device(device)
        self.model = net.to(self.device)
        self.factor = int(net.config.factor)
        self.latent_channels = int(net.config.latent_channels)

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"tinyae images must be (B, 3, H, W) in [-1, 1], got {tuple(images_B3HW.shape)}")
        self.check_size(images_B3HW.shape[-2:])
        return (self.model.encode(images_B3HW.to(self.device, torch.float32)) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        if latents_BChw.shape[-3] != self.latent_channels:
            raise ValueError(f"tinyae {self.path!r} needs C={self.latent_channels}, got {latents_BChw.shape[-3]}")
        return self.model.decode(latents_BChw.to(self.device, torch.float32) / self.scaling_factor).float()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "tinyae",
            "path": self.path,
            "sha256": self.sha256,
            "factor": self.factor,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
        }


# Where a codec's weights are read from and its compute dtype: they may differ between training and sampling; every
# other key of a description (type, factor, channels, scaling factor, a file's sha256) decides the latents' meaning.
LOCATION_KEYS = frozenset({"path", "dtype"})


def check_same_codec(given: Codec, recorded: dict[str, Any] | None, trained: str) -> None:
    """A codec passed by hand must be the one `trained` recorded (only its path and dtype may differ): another kind with
    the same channel count decodes the latents into noise, and a different tinyae file into wrong colours."""
    if recorded is None:
        return
    diffs = differences(recorded, given.describe(), ignore=LOCATION_KEYS)
    if diffs:
        raise ValueError(f"--codec {given.describe().get('type')} is not the codec {trained} was trained with "
                         f"({describe_differences(diffs)}); pass that codec (only its path or dtype may differ), or "
                         "leave --codec out to use the recorded one")


def codec_from_description(description: dict[str, Any], device: str | torch.device = "cpu") -> Codec:
    """Rebuild a codec from `describe()`; the DC-AE weights are read again from the recorded local path or cache."""
    kind = description.get("type")
    if kind == "pixel":
        return PixelCodec(int(description["factor"]))
    if kind == "dcae":
        codec = DCAECodec(description["path"], dtype=description.get("dtype", "float32"), device=device)
        recorded = description.get("scaling_factor")
        if recorded is not None and abs(float(recorded) - codec.scaling_factor) > 1e-9:
            raise ValueError(
                f"DC-AE at {description['path']!r} has scaling_factor {codec.scaling_factor}, but the latents were "
                f"made with {recorded}: this is a different model; point to the one used by `prepare`"
            )
        return codec
    if kind == "tinyae":
        codec = TinyAECodec(description["path"], device=device)
        if description.get("sha256") != codec.sha256:
            raise ValueError(
                f"tinyae {description['path']!r} has sha256 {codec.sha256[:12]}…, but the latents were made with "
                f"{str(description.get('sha256'))[:12]}…: the weights changed since `prepare`; restore that file or "
                "prepare the shards again with this one"
            )
        return codec
    raise ValueError(f"unknown codec description {description!r}: expected type 'pixel', 'dcae' or 'tinyae'")


def codec_from_spec(spec: str, dtype: str = "float32", device: str | torch.device = "cpu") -> Codec:
    """Command-line form: 'pixel:8', 'dcae:/path/or/hf-id' (dcae alone: the default SANA-1.1 f32c32 id) or
    'tinyae:/path/to/file.pt'."""
    kind, _, arg = spec.partition(":")
    if kind == "pixel":
        try:
            return PixelCodec(int(arg or 8))
        except ValueError as error:
            raise ValueError(f"codec {spec!r}: {error}; expected {CODEC_SPEC_HELP}") from error
    if kind == "dcae":
        return DCAECodec(arg or DEFAULT_DCAE_ID, dtype=dtype, device=device)
    if kind == "tinyae":
        if not arg:
            raise ValueError(f"codec {spec!r} needs a file: tinyae:PATH")
        return TinyAECodec(arg, device=device)
    raise ValueError(f"codec {spec!r} is not {CODEC_SPEC_HELP}")


def resolve_codec(
    codec: Codec | str | dict | None,
    fallback: dict | None,
    *,
    missing: str,
    device: str | torch.device = "cpu",
    fallback_name: str = "fallback description",
) -> tuple[Codec, str]:
    """A codec given as an object, a spec ('pixel:8', 'dcae:PATH', 'tinyae:PATH') or a description, else rebuilt from `fallback`
    (a checkpoint's or a datamodule's description); returns it with where it came from. Neither: ValueError(missing)."""
    if isinstance(codec, Codec):
        return codec, "given"
    if isinstance(codec, str):
        return codec_from_spec(codec, device=device), f"--codec {codec}"
    if isinstance(codec, dict):
        return codec_from_description(codec, device=device), "given description"
    if fallback is None:
        raise ValueError(missing)
    return codec_from_description(dict(fallback), device=device), fallback_name


@runtime_checkable
class DescribesItsCodec(Protocol):
    """A datamodule whose latents say which codec made them (NativeLatentDataModule: from the shards' index.json):
    the interface through which training finds the codec to record in checkpoints and to decode sample grids."""

    codec_description: dict[str, Any] | None


def codec_description_of(datamodule: Any) -> dict[str, Any] | None:
    """The codec description of a datamodule that has one (`DescribesItsCodec`), else None."""
    if not isinstance(datamodule, DescribesItsCodec) or datamodule.codec_description is None:
        return None
    return dict(datamodule.codec_description)
