"""Recipe search for `make demo-t2i` (issue 19 item 7): a standalone NiT-T2I run on the synthetic captioned set, timed
per stage, scored by nit_lightning/demo/t2i_metrics.py (shape, colour, both-correct ± standard error per
(seen / held-out pair) × (seen / unseen size)). A manual loop over the library's pieces, not the Lightning module:

  images (write_captioned_synthetic) -> tinyae codec -> latents (native sizes, multiples of 8, + flips)
  -> tinytext captions -> NiT-T2I, flow matching, caption dropout to the null caption, AdamW + warmup + cosine, EMA
  -> Heun + CFG (interval) from prompts, RoPE interpolation beyond the trained side -> decode -> score.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/t2i_demo_recipe.py --out /tmp/t2i --threads 1 --steps 2000

Each stage's output is kept in --out and reused when its settings are unchanged (images, codec, latents, encoder,
shape classifier); training and scoring rerun. Prints a JSON line of timings and the table; writes results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    # data
    p.add_argument("--num-images", type=int, default=2400)
    p.add_argument("--min-side", type=int, default=32)
    p.add_argument("--max-side", type=int, default=64)
    p.add_argument("--small-fraction", type=float, default=0.0)
    # codec
    p.add_argument("--ae-steps", type=int, default=1000)
    # text encoder
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=1)
    # network
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=32, help="adaLN LoRA rank (0: full modulation)")
    # training
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--tokens-per-pack", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr-min-ratio", type=float, default=0.05)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--attn", default="auto", help="attention backend (CPU: loop, sdpa_mask)")
    p.add_argument("--sort-pack", type=int, default=1, help="order a pack's images by (grid, caption length): the loop "
                   "backend runs equal neighbours as one batch")
    p.add_argument("--time-only", type=int, default=0, help="time this many training steps and stop")
    # sampling / evaluation
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 0.9))
    p.add_argument("--per-group", type=int, default=80, help="samples per (pair, size) group")
    p.add_argument("--seen-sizes", nargs="+", default=["64x64", "32x64", "64x32"])
    p.add_argument("--unseen-sizes", nargs="+", default=["96x96", "32x128", "128x32"])
    p.add_argument("--tokens-per-forward", type=int, default=4096)
    p.add_argument("--shape-epochs", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=0, help="also score the EMA net every N steps (seen sizes only)")
    return p.parse_args(argv)


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.time()

            def __exit__(self, *exc):
                timer.times[name] = round(time.time() - self.t0, 1)
                print(f"[{name}] {timer.times[name]} s", flush=True)

        return _Ctx()


def make_images(args, root: Path) -> dict:
    from nit_lightning.data.synthetic_captions import CaptionedSynthSettings, write_captioned_synthetic

    return write_captioned_synthetic(CaptionedSynthSettings(
        out=str(root), num_images=args.num_images, min_side=args.min_side, max_side=args.max_side, seed=args.seed,
        small_fraction=args.small_fraction, held_out_per_shape=1, held_out_images=0))


def make_codec(args, root: Path, path: Path) -> None:
    from nit_lightning.data.tinyae import TinyAEConfig, TinyAETrainSettings, train_tinyae

    if not path.is_file():  # the C2I demo's codec: f8, 8 channels
        print(train_tinyae(root, path, TinyAEConfig(latent_channels=8, factor=8, width=128, blocks=2),
                           TinyAETrainSettings(steps=args.ae_steps, batch_size=32, crop=32, lr=2e-3, latent_noise=0.0,
                                               seed=args.seed)))


def encode_images(lines: list[dict], codec_path: Path, cache: Path) -> tuple[list[torch.Tensor], list[str]]:
    """Latents (C, h, w) of every training image at its native size (sides down to a multiple of 8, as `prepare`
    native does) and of its mirror image, with their captions."""
    from nit_lightning.data.codecs import TinyAECodec
    from nit_lightning.data.imageops import image_to_tensor, open_rgb, resize_native

    if cache.is_file():
        saved = torch.load(cache)
        return saved["latents"], saved["captions"]
    codec = TinyAECodec(codec_path)
    latents, captions = [], []
    for line in lines:
        image, _ = resize_native(open_rgb(line["file"]), 8)
        x = image_to_tensor(image)[None]
        z = codec.encode(torch.cat([x, x.flip(-1)]))
        latents += [z[0], z[1]]
        captions += [line["caption"]] * 2
    torch.save({"latents": latents, "captions": captions}, cache)
    return latents, captions


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.lr_min_ratio + (1 - args.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_bank(encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    """(L, E) tokens of every distinct caption, '' -> (0, E): the encoder is frozen, so once is enough."""
    distinct = sorted(set(texts) | {""})
    out = encoder.encode(distinct)
    return dict(zip(distinct, out.tokens.split(out.lengths.tolist())))


def train(args, net, latents, captions, bank, eval_fn=None):
    from nit_lightning.diffusion.flow import FlowMatchingLoss
    from nit_lightning.models.patching import pack_latents
    from nit_lightning.models.text import PackedText

    loss_fn = FlowMatchingLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(latents), generator=gen).tolist(), 0
    tokens_of = [z.shape[1] * z.shape[2] for z in latents]
    steps = args.time_only or args.steps
    t0, log = time.time(), []
    for step in range(steps):
        batch, used = [], 0
        while True:  # fill the pack in epoch order; the image that does not fit opens the next pack
            if pos == len(order):
                order, pos = torch.randperm(len(latents), generator=gen).tolist(), 0
            if used + tokens_of[order[pos]] > args.tokens_per_pack:
                break
            batch.append(order[pos])
            used += tokens_of[order[pos]]
            pos += 1
        if args.sort_pack:
            batch.sort(key=lambda i: (latents[i].shape[1], latents[i].shape[2], len(captions[i])))
        x0, hw = pack_latents([latents[i] for i in batch], 1)
        drop = (torch.rand(len(batch), generator=gen) < args.caption_dropout).tolist()
        text = PackedText.from_list([bank["" if d else captions[i]] for i, d in zip(batch, drop)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        out = loss_fn(net, x0, text, hw, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 100 == 0 or step == steps - 1:
            rate = (time.time() - t0) / (step + 1)
            print(f"step {step + 1}/{steps} loss {out.loss.item():.4f} images {len(batch)} tokens {used} "
                  f"{rate * 1000:.0f} ms/step", flush=True)
        if eval_fn is not None and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            log.append({"step": step + 1, **eval_fn(ema)})
    return ema, (time.time() - t0) / steps, log


def prompts_for(args, manifest: dict, sizes_seen, sizes_unseen, with_unseen: bool = True) -> list[dict]:
    """Per (pair kind, size kind) group `per_group` prompts: pairs cycled in the manifest's order, sizes cycled."""
    from nit_lightning.data.synthetic_captions import caption

    pairs = {"seen": [tuple(p) for p in manifest["seen"]],
             "held-out": [tuple(p) for p in manifest["held_out"]]}
    size_kinds = {"seen": sizes_seen, **({"unseen": sizes_unseen} if with_unseen else {})}
    out = []
    for pk, plist in pairs.items():
        for sk, sizes in size_kinds.items():
            for j in range(args.per_group):
                colour, shape = plist[j % len(plist)]
                # sizes change fastest within a pair's repeats: pair j mod n at size (j // n) mod len(sizes)
                hw = sizes[(j // len(plist) + j) % len(sizes)]
                out.append({"prompt": caption(colour, shape), "colour": colour, "shape": shape, "pair": pk,
                            "size": sk, "hw": hw, "seed": len(out)})
    return out


@torch.no_grad()
def generate(args, net, state, prompts, bank_fn, codec, train_side: int) -> list[np.ndarray]:
    from nit_lightning.diffusion.sampling import SampleRequest, plan_sample_packs, sample_pack
    from nit_lightning.models.text import PackedText

    live = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    net.eval()
    texts = [p["prompt"] for p in prompts]
    bank = bank_fn(texts)
    images: list[np.ndarray | None] = [None] * len(prompts)
    requests = [SampleRequest(i, (p["hw"][0] // 8, p["hw"][1] // 8), i, p["seed"]) for i, p in enumerate(prompts)]
    by_scale: dict[float, list] = {}
    for r in requests:  # RoPE positions interpolated beyond the trained side, one factor per pack
        by_scale.setdefault(max(1.0, max(r.hw) / train_side), []).append(r)
    for scale, reqs in by_scale.items():
        def model_fn(x, t, y, hw, scale=scale):
            # y: prompt indices, -1 = the null caption (CFG's unconditional branch: null_class=-1)
            text = PackedText.from_list([bank[texts[i]] if i >= 0 else bank[""] for i in y.tolist()])
            meta = net.build_meta(hw, x.shape[0], text.lengths, text.tokens.shape[0],
                                  rope_interp_scale=None if scale == 1.0 else scale)
            return net(x, t, text, hw, meta=meta)

        for pack in plan_sample_packs(reqs, args.tokens_per_forward, cfg=args.cfg != 1.0):
            x = sample_pack(model_fn, pack, net.config.token_dim, method="heun", steps=args.sample_steps,
                            cfg_scale=args.cfg, cfg_interval=tuple(args.cfg_interval), null_class=-1,
                            dtype=torch.float32)
            sizes = [r.tokens for r in pack]
            for r, z in zip(pack, x.split(sizes)):
                lat = z.reshape(r.hw[0], r.hw[1], -1).permute(2, 0, 1)[None]
                img = codec.decode(lat)[0].clamp(-1, 1)
                images[r.index] = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    net.load_state_dict(live)
    net.train()
    return images  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from nit_lightning.data.synthetic_captions import possible_captions
    from nit_lightning.data.codecs import TinyAECodec
    from nit_lightning.data.sizes import parse_size
    from nit_lightning.data.tinytext import TinyTextConfig, load_tiny_text_encoder, make_tiny_text_encoder, \
        save_tiny_text_encoder
    from nit_lightning.demo.t2i_metrics import format_table, read_captions, score, train_shape_classifier
    from nit_lightning.models.nit_t2i import build_nit_t2i

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"images-{args.num_images}-{args.min_side}-{args.max_side}-{args.small_fraction}-s{args.seed}"
    timer = Timer()
    with timer("1-images"):
        manifest = make_images(args, data)
    lines = read_captions(data, ["train"])
    with timer("2-codec"):
        make_codec(args, data, data / "tinyae.pt")
    with timer("3-latents"):
        latents, captions = encode_images(lines, data / "tinyae.pt", data / "latents.pt")
    with timer("4-text-encoder"):
        tpath = data / f"tinytext-{args.text_dim}-{args.text_layers}.pt"
        if not tpath.is_file():
            save_tiny_text_encoder(make_tiny_text_encoder(possible_captions(), TinyTextConfig(
                dim=args.text_dim, max_length=16, layers=args.text_layers, heads=4, seed=args.seed)), tpath)
        encoder = load_tiny_text_encoder(tpath)
        bank = caption_bank(encoder, captions)
    with timer("5-shape-classifier"):
        spath = data / f"shape-{args.shape_epochs}.pt"
        if not spath.is_file():
            print(train_shape_classifier(data, spath, epochs=args.shape_epochs, seed=args.seed))

    torch.manual_seed(args.seed)
    net = build_nit_t2i("NiT-T2I-debug", depth=args.depth, hidden_size=args.width, num_heads=args.heads,
                        in_channels=8, text_dim=args.text_dim, modulation_rank=args.rank or None,
                        attn_backend=args.attn)
    params = sum(p.numel() for p in net.parameters())
    print(f"net: {params:,} parameters; {len(latents)} latents (with flips)", flush=True)
    codec = TinyAECodec(data / "tinyae.pt")
    seen = [parse_size(s) for s in args.seen_sizes]
    unseen = [parse_size(s) for s in args.unseen_sizes]
    train_side = args.max_side // 8
    bank_fn = lambda texts: caption_bank(encoder, texts)  # noqa: E731

    def eval_fn(state):
        prompts = prompts_for(args, manifest, seen, unseen, with_unseen=False)
        images = generate(args, net, state, prompts, bank_fn, codec, train_side)
        return {k: v["both"]["rate"] for k, v in score(images, prompts, spath)["groups"].items()}

    with timer("6-train"):
        ema, sec_per_step, log = train(args, net, latents, captions, bank, eval_fn)
    result = {"args": vars(args), "params": params, "sec_per_step": round(sec_per_step, 4), "eval_log": log}
    if args.time_only:
        result["timings"] = timer.times
        print(json.dumps(result), flush=True)
        return result
    with timer("7-sample"):
        prompts = prompts_for(args, manifest, seen, unseen)
        images = generate(args, net, ema, prompts, bank_fn, codec, train_side)
    with timer("8-score"):
        scored = score(images, prompts, spath)
    result.update(timings=timer.times, groups=scored["groups"])
    tag = f"d{args.depth}w{args.width}r{args.rank}-s{args.steps}-tp{args.tokens_per_pack}-cfg{args.cfg}-m{args.max_side}"
    (out / f"results-{tag}.json").write_text(json.dumps(result, indent=1))
    np.savez_compressed(out / f"samples-{tag}.npz", **{f"i{i}": im for i, im in enumerate(images[:200])})
    print(format_table(scored["groups"]))
    print(json.dumps({k: v for k, v in result.items() if k != "groups"}), flush=True)
    return result


if __name__ == "__main__":
    main()
