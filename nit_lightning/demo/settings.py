"""Settings of the end-to-end CPU demo: one dataclass, a full and a `--quick` preset, and the ablation's data mixtures."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The ablation's three data mixtures (the CPU-scale counterpart of the paper's NiT-B ablation, SPEC §4):
# (a) native only, (b) native + fixed-64 + fixed-128 ("mix"), (c) fixed-64 + fixed-128 only. With pixel:8,
# fixed-64 = 8×8 = 64 tokens and fixed-128 = 16×16 = 256 tokens: the token counts of the paper's fixed-256 / fixed-512
# under DC-AE f32 (256/32 = 8, 512/32 = 16).
MIXTURES: dict[str, list[str]] = {
    "native": ["native"],
    "mix": ["native", "fixed-{a}", "fixed-{b}"],
    "fixed": ["fixed-{a}", "fixed-{b}"],
}


@dataclass
class DemoSettings:
    """Everything that decides what the demo computes; `out` and the flags decide where and which steps."""

    out: str = "demo_out"
    ablation: bool = False
    quick: bool = False
    threads: int = 2  # torch intra-op threads: the demo is sized for 2 CPU cores
    seed: int = 0
    # 1. synthetic images: sides 32..128 px, aspect ratios 1:3..3:1; val is held out of every training
    num_images: int = 2400
    val_fraction: float = 0.25  # 1800 train + 600 val: the references need more val images than feature dims (256)
    num_classes: int = 10
    min_side: int = 32
    max_side: int = 128
    # 2. latents: pixel:8 is lossless space-to-depth, C = 3·8·8 = 192; a 128-px side = 16 tokens
    codec: str = "pixel:8"
    fixed_sizes: tuple[int, int] = (64, 128)  # fixed-64 = 8×8 = 64 tokens, fixed-128 = 16×16 = 256 tokens
    samples_per_shard: int = 500
    # 3. training (experiments/demo.yaml holds the rest; these override it)
    config: str = "experiments/demo.yaml"
    train_steps: int = 1200
    tokens_per_pack: int = 1024  # ≈ 16 images of the set's mean size (~64 tokens)
    lr: float = 1e-3
    # Width before depth: the net must carry the noise of a 192-dim token (v = ε − x0) through its hidden size, so
    # D < 192 is a bottleneck. Measured: depth 4, D 128 plateaued at loss 0.7 and made noise; depth 2, D 192 reached
    # 0.3–0.45 in 300 steps with its x0 error at t = 0.95 halved (docs/demo.md).
    depth: int = 2
    hidden_size: int = 192  # 1.1M parameters
    num_heads: int = 4  # head dim 48: 24 channels (12 rotation pairs) per RoPE axis
    ema_decay: float = 0.995  # half-life ln 2 / 0.005 ≈ 140 steps: short runs need a short EMA
    grid_every: int = 600  # a grid of every size costs as much as ~40 training steps: two per run
    # 4. sampling: seen sizes, unseen larger sizes, unseen aspect ratios (1:3 and 3:1 beyond 128 px)
    # Cost per image ∝ tokens: 64, 256, 576, 192, 192 (256x256 = 1024 tokens would cost as much as all of these).
    sizes: tuple[str, ...] = ("64x64", "128x128", "192x192", "64x192", "192x64")
    # Per size, class-balanced (a multiple of num_classes). Measured on one core: 100 per size took 317 s (192x192 alone
    # 156 s); 50 keeps the demo near 10 minutes. FID over fewer samples than feature dims (128) is biased: compare rows.
    num_samples: int = 50
    method: str = "euler"
    sample_steps: int = 16
    # A weak model needs strong guidance early: at scale 2 on [0, 0.7] the samples barely differ by class, at 4 on
    # [0, 1] class colours and textures show (grids compared by eye on the 1200-step checkpoint); 0.9 keeps an interval.
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.0, 0.9)
    sample_tokens_per_pack: int = 8192
    # 5. evaluation: the demo feature net (NOT Inception) trained on the training images
    featurenet_size: int = 64  # ~2.4 ms per image per training step on one loaded core: 6 epochs ≈ 30 s
    featurenet_epochs: int = 6
    reference_subset: int = 600  # images kept as arr_0 for precision/recall
    grid_classes: list[int] = field(default_factory=lambda: list(range(10)))

    def __post_init__(self) -> None:
        if self.num_samples % self.num_classes:
            raise ValueError(f"num_samples={self.num_samples} must be a multiple of num_classes={self.num_classes} "
                             "(class-balanced samples: label i mod num_classes)")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")
        factor = int(self.codec.split(":")[1]) if self.codec.startswith("pixel:") else 32
        for size in self.sizes:
            h, w = (int(v) for v in size.split("x"))
            if h % factor or w % factor:
                raise ValueError(f"sample size {size} is not a multiple of the codec factor {factor}")

    def runs(self) -> dict[str, list[str]]:
        """Run name -> prepare modes of its training data: `native` alone, or the three mixtures with --ablation."""
        a, b = self.fixed_sizes
        mixtures = {name: [m.format(a=a, b=b) for m in modes] for name, modes in MIXTURES.items()}
        return mixtures if self.ablation else {"native": mixtures["native"]}

    def modes(self) -> list[str]:
        """Every prepare mode some run needs, in a fixed order."""
        seen: list[str] = []
        for modes in self.runs().values():
            seen += [m for m in modes if m not in seen]
        return seen

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# `--quick`: the same pipeline shrunk to run in about a minute (the end-to-end test uses it).
QUICK: dict[str, Any] = dict(
    num_images=240, val_fraction=0.25, num_classes=4, min_side=32, max_side=64, samples_per_shard=100,
    train_steps=12, tokens_per_pack=512, depth=2, hidden_size=64, num_heads=2, grid_every=6,
    sizes=("32x32", "64x64", "32x96"), num_samples=8, sample_steps=4, sample_tokens_per_pack=2048,
    fixed_sizes=(32, 64), featurenet_size=16, featurenet_epochs=4, reference_subset=60,
    grid_classes=[0, 1, 2, 3],
)


def make_settings(out: str = "demo_out", *, ablation: bool = False, quick: bool = False, **overrides: Any) -> DemoSettings:
    """The full preset, or the quick one, with `overrides` (any DemoSettings field) on top."""
    base: dict[str, Any] = dict(QUICK) if quick else {}
    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown demo settings {unknown}; valid: {sorted(fields)}")
    return DemoSettings(out=out, ablation=ablation, quick=quick, **{**base, **overrides})
