"""generation.generate: one image does not depend on its pack; RoPE interpolation per image size (SPEC §1.1)."""
from __future__ import annotations

import copy

import torch

from helpers.nets import random_debug_net
from nit_lightning.data.codecs import PixelCodec
from nit_lightning.generation.images import ImageRequest, class_balanced, generate
from nit_lightning.generation.pipeline import Pipeline
from nit_lightning.generation.settings import SamplerSettings


def _images(pipeline, requests, sampler, tokens_per_forward=4096):
    return {r.index: image for batch in generate(pipeline, requests, sampler, tokens_per_forward=tokens_per_forward)
            for r, image in zip(batch.requests, batch.images)}


def test_an_image_does_not_depend_on_its_pack_or_the_budget():
    pipeline = Pipeline(net=random_debug_net().eval(), codec=PixelCodec(2))
    sampler = SamplerSettings(steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.7), precision="float32")
    requests = class_balanced(range(6), (8, 8), 3, seed=1) + class_balanced(range(6, 9), (4, 12), 3, seed=1)
    together = _images(pipeline, requests, sampler)
    alone = {**_images(pipeline, requests[:1], sampler), **_images(pipeline, requests[-1:], sampler)}
    small_packs = _images(pipeline, requests, sampler, tokens_per_forward=40)
    for index, image in alone.items():
        assert torch.equal(image, together[index])
    assert all(torch.equal(small_packs[i], together[i]) for i in together)


def test_rope_interpolation_applies_per_image_size():
    """Off by default (equal to today's outputs); with a side of 4 tokens a 4x12 grid samples with positions / 3,
    exactly what a net configured with rope_interp_scale=3 gives, whichever images share its pack."""
    net = random_debug_net().eval()
    pipeline = Pipeline(net=net, codec=PixelCodec(2))
    base = SamplerSettings(steps=2, cfg_scale=1.5, precision="float32")
    interpolated = SamplerSettings(steps=2, cfg_scale=1.5, precision="float32", rope_interp_side=4)
    assert interpolated.rope_interp_scale((4, 12)) == 3.0 and interpolated.rope_interp_scale((4, 4)) == 1.0
    small, wide = ImageRequest(0, (8, 8), 1, 11), ImageRequest(1, (8, 24), 2, 12)
    plain = _images(pipeline, [small, wide], base)
    mixed = _images(pipeline, [small, wide], interpolated)
    assert torch.equal(mixed[0], plain[0])  # a 4x4 grid is within the side: untouched
    assert not torch.equal(mixed[1], plain[1])
    scaled_net = copy.deepcopy(net)
    scaled_net.config.rope_interp_scale = 3.0
    reference = _images(Pipeline(net=scaled_net, codec=PixelCodec(2)), [wide], base)
    assert torch.equal(mixed[1], reference[1])
