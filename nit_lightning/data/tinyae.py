"""A tiny convolutional autoencoder (the `tinyae:PATH` codec): network, training on an image folder, saving, loading.

It plays DC-AE's part in the CPU demo: a learned, lossy, low-channel latent space that a narrow NiT can model, so the
net's width no longer has to match 3·f² pixel channels. Like DC-AE, latent = encoder(image in [-1, 1]) · scaling_factor,
with the factor stored in the file (here 1 / the std of the raw latents over the training crops: unit variance).
Pure torch: no Lightning. Trains in well under a minute on 2 CPU cores on the demo's synthetic images.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nit_lightning.data.imageops import image_to_tensor, open_rgb
from nit_lightning.data.listing import list_images
from nit_lightning.data.saved import load_payload, save_payload

log = logging.getLogger(__name__)

KIND = "nit-tinyae"
FORMAT_VERSION = 1


@dataclass
class TinyAEConfig:
    """Architecture: space-to-depth by `factor`, residual 3×3 convs at the latent resolution, depth-to-space back."""

    latent_channels: int = 4
    factor: int = 8
    width: int = 128
    blocks: int = 2  # residual blocks in the encoder and in the decoder

    def __post_init__(self) -> None:
        if self.latent_channels < 1 or self.width < 1 or self.blocks < 0 or self.factor < 1:
            raise ValueError(f"tinyae config {self} needs latent_channels, width, factor ≥ 1 and blocks ≥ 0")


class _ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)))): 3×3 convs, so each latent pixel sees its neighbours (overlapping context)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class TinyAE(nn.Module):
    """encode: (B, 3, H, W) in [-1, 1] -> raw latents (B, C, H/f, W/f); decode: the reverse (no scaling here).

    Every layer after the space-to-depth runs at the latent resolution (f² fewer pixels), which is what makes it
    train in seconds: at f = 8 a 32×32 crop is 4×4 latent pixels.
    """

    def __init__(self, config: TinyAEConfig) -> None:
        super().__init__()
        self.config = config
        f, w, c = config.factor, config.width, config.latent_channels
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(f), nn.Conv2d(3 * f * f, w, 1), *[_ResBlock(w) for _ in range(config.blocks)],
            nn.SiLU(), nn.Conv2d(w, c, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), *[_ResBlock(w) for _ in range(config.blocks)],
            nn.SiLU(), nn.Conv2d(w, 3 * f * f, 1), nn.PixelShuffle(f))

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return self.encoder(images_B3HW)

    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents_BChw)


@dataclass
class TinyAETrainSettings:
    """How `train_tinyae` trains: random crops of the training images, Adam with a one-cycle schedule."""

    steps: int = 600
    batch_size: int = 32
    crop: int = 32  # every demo image has sides ≥ 32 px; a multiple of the factor
    lr: float = 2e-3
    latent_noise: float = 0.1  # decoder sees z + noise·std(z)·ε: it must decode slightly-off latents (as sampled ones are)
    seed: int = 0


def _load_images(files: list[Path]) -> list[torch.Tensor]:
    return [image_to_tensor(open_rgb(path)) for path in files]  # (3, H, W) in [-1, 1]


def _crops(images: list[torch.Tensor], count: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random crop×crop crops (random image, offset, horizontal flip) -> (count, 3, crop, crop)."""
    picks = torch.randint(len(images), (count,), generator=gen).tolist()
    out = []
    for i in picks:
        image = images[i]
        _, h, w = image.shape
        top = int(torch.randint(h - crop + 1, (1,), generator=gen))
        left = int(torch.randint(w - crop + 1, (1,), generator=gen))
        patch = image[:, top:top + crop, left:left + crop]
        out.append(patch.flip(-1) if bool(torch.rand((), generator=gen) < 0.5) else patch)
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)))
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_tinyae(data_dir: str | Path, out: str | Path, config: TinyAEConfig | None = None,
                 settings: TinyAETrainSettings | None = None) -> dict[str, Any]:
    """Train on the images of an image folder (any depth), fit the latent scale, save to `out`; returns the report."""
    config, settings = config or TinyAEConfig(), settings or TinyAETrainSettings()
    if settings.crop % config.factor:
        raise ValueError(f"tinyae crop {settings.crop} must be a multiple of the factor {config.factor}")
    files = list_images(data_dir)
    start = time.time()
    images = _load_images(files)
    small = [f"{p.name} {tuple(x.shape[1:])}" for p, x in zip(files, images) if min(x.shape[1:]) < settings.crop]
    if small:
        raise ValueError(f"{len(small)} images are smaller than the {settings.crop}-px crop (e.g. {small[0]}); "
                         "pass a smaller crop")
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    net = TinyAE(config)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1)
    for step in range(settings.steps):
        x = _crops(images, settings.batch_size, settings.crop, gen)
        z = net.encode(x)
        if settings.latent_noise > 0:  # relative to the batch's latent std, so the noise level follows the scale
            noise = torch.randn(z.shape, generator=gen)
            z = z + settings.latent_noise * z.detach().std() * noise
        loss = F.mse_loss(net.decode(z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == settings.steps - 1:
            log.info("tinyae step %d/%d: mse %.5f", step + 1, settings.steps, loss.item())
    net.eval()
    with torch.no_grad():  # latent std and PSNR on a fixed set of crops (not the training draws)
        held = _crops(images, 256, settings.crop, torch.Generator().manual_seed(settings.seed + 1))
        z = net.encode(held)
        scaling_factor = 1.0 / float(z.std())
        recon_psnr = psnr(net.decode(z), held)
    report = {"images": len(files), "steps": settings.steps, "final_mse": loss.item(), "crop_psnr": round(recon_psnr, 2),
              "latent_std": round(1.0 / scaling_factor, 5), "seconds": round(time.time() - start, 1),
              "settings": asdict(settings)}
    save_tinyae(net, out, scaling_factor=scaling_factor, report=report)
    return report


def save_tinyae(net: TinyAE, out: str | Path, *, scaling_factor: float, report: dict[str, Any]) -> None:
    save_payload(out, {"kind": KIND, "version": FORMAT_VERSION, "config": asdict(net.config),
                       "state_dict": net.state_dict(), "scaling_factor": float(scaling_factor), "report": report})


def load_tinyae(path: str | Path) -> tuple[TinyAE, float, dict[str, Any]]:
    """(network in eval mode, scaling factor, payload) from a file written by `save_tinyae`; strict."""
    payload = load_payload(path, kind=KIND, version_key="version", version=FORMAT_VERSION, what="tinyae",
                           how_to_make="python -m nit_lightning tinyae --data DIR --out FILE.pt")
    net = TinyAE(TinyAEConfig(**payload["config"]))
    net.load_state_dict(payload["state_dict"], strict=True)
    return net.eval().requires_grad_(False), float(payload["scaling_factor"]), payload
