"""Reference batches: ADM npz round trip, the resize + centre-crop protocol, building from a folder, extractor checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nit_lightning.cli import reference as reference_cmd
from nit_lightning.data.listing import list_images
from nit_lightning.data.sizes import parse_size
from nit_lightning.evaluation.extractors import BatchedExtractor, load_feature_extractor
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, save_featurenet
from nit_lightning.evaluation.reference import (
    Reference,
    build_reference,
    check_extractor,
    fit_to_size,
    load_reference,
    reference_pool,
    save_reference,
)


def small_extractor(name: str = "test-featurenet") -> BatchedExtractor:
    torch.manual_seed(0)
    return BatchedExtractor(FeatureNet(FeatureNetConfig(num_classes=4, size=16)).eval(), name, batch_size=8)


def write_folder(root, n: int = 12, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(20, 90, size=2)
        sub = root / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")


def test_npz_round_trip_and_adm_compatibility(tmp_path, caplog):
    rng = np.random.default_rng(0)
    ref = Reference(mu=rng.normal(size=4), sigma=np.eye(4), mu_s=rng.normal(size=3), sigma_s=2 * np.eye(3),
                    images=rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8),
                    pool=rng.normal(size=(5, 4)).astype(np.float32), meta={"extractor": "x", "size": [8, 6]})
    save_reference(tmp_path / "r.npz", ref)
    back = load_reference(tmp_path / "r.npz")
    for key in ("mu", "sigma", "mu_s", "sigma_s", "images", "pool"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ref, key))
    assert back.meta == ref.meta and back.extractor == "x"
    with np.load(tmp_path / "r.npz", allow_pickle=False) as data:  # what ADM's evaluator reads
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)
    # A public ADM batch carries no metadata: assumed Inception, and it says so.
    np.savez(tmp_path / "adm.npz", arr_0=ref.images, mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s)
    adm = load_reference(tmp_path / "adm.npz")
    assert adm.extractor == "inception-2015-12-05" and adm.meta["size"] == [8, 6] and "assuming" in caplog.text
    np.savez(tmp_path / "bad.npz", arr_0=ref.images)
    with pytest.raises(KeyError, match="mu"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="reference build"):
        load_reference(tmp_path / "none.npz")


def _adm_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's square protocol, written out as the slow reference."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


@pytest.mark.parametrize("wh", [(300, 100), (97, 211), (64, 64), (20, 30)])
def test_protocol_equals_adm_for_square_targets(wh):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(wh[1], wh[0], 3), dtype=np.uint8))
    np.testing.assert_array_equal(fit_to_size(image, 32, 32), _adm_center_crop(image, 32))


def test_protocol_aspect_ratio_is_centred():
    # Columns encode x: a 100x400 (HxW) ramp brought to 32x96 halves once (200x50), scales by 0.64 to 128x32, and
    # crops 16 columns off each side.
    ramp = np.broadcast_to(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], (100, 400, 3)).copy()
    out = fit_to_size(Image.fromarray(ramp), 32, 96)
    assert out.shape == (32, 96, 3)
    full = np.array(Image.fromarray(ramp).resize((200, 50), Image.BOX).resize((128, 32), Image.BICUBIC))
    np.testing.assert_array_equal(out, full[:, 16:112])


def test_build_reference_statistics_over_all_and_seeded_subset(tmp_path):
    write_folder(tmp_path / "imgs")
    extractor = small_extractor()
    ref = build_reference(tmp_path / "imgs", (16, 24), extractor, subset=5, seed=3, batch_size=4)
    files = list_images(tmp_path / "imgs")
    arrays = np.stack([fit_to_size(Image.open(f), 16, 24) for f in files])
    feats = extractor(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    np.testing.assert_allclose(ref.mu, feats["pool"].double().mean(0).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref.sigma_s, np.cov(feats["spatial"].double().numpy(), rowvar=False), rtol=1e-5,
                               atol=1e-7)
    chosen = np.sort(np.random.default_rng(3).choice(12, size=5, replace=False))
    np.testing.assert_array_equal(ref.images, arrays[chosen])
    np.testing.assert_allclose(ref.pool, feats["pool"][chosen].numpy(), rtol=1e-5, atol=1e-6)
    assert ref.meta["num_images"] == 12 and ref.meta["subset"] == 5 and ref.meta["extractor"] == extractor.name
    torch.testing.assert_close(reference_pool(ref, extractor), torch.from_numpy(ref.pool))
    ref.pool = None  # recomputed from arr_0 when no cache
    torch.testing.assert_close(reference_pool(ref, extractor), feats["pool"][chosen], rtol=1e-5, atol=1e-6)


def test_other_extractor_is_an_error():
    ref = Reference(mu=np.zeros(256), sigma=np.eye(256), mu_s=np.zeros(512), sigma_s=np.eye(512),
                    meta={"extractor": "inception-2015-12-05"})
    with pytest.raises(ValueError, match="made with features 'inception-2015-12-05'"):
        check_extractor(ref, small_extractor(), "ref.npz")


def test_parse_size():
    assert parse_size("480x640") == (480, 640) and parse_size("256") == (256, 256)
    with pytest.raises(ValueError, match="HxW"):
        parse_size("big")


def test_reference_cli_build_and_show(tmp_path, capsys):
    write_folder(tmp_path / "imgs", n=6)
    torch.manual_seed(0)
    save_featurenet(FeatureNet(FeatureNetConfig(num_classes=2, size=16)), tmp_path / "f.pt", classes=["a", "b"],
                    report={})
    out = tmp_path / "refs" / "16x32.npz"
    assert reference_cmd.main(["build", "--images", str(tmp_path / "imgs"), "--size", "16x32", "--out", str(out),
                               "--features", f"featurenet:{tmp_path / 'f.pt'}", "--subset", "4"]) == 0
    capsys.readouterr()
    assert reference_cmd.main(["show", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["arr_0"] == [4, 16, 32, 3] and shown["meta"]["size"] == [16, 32]
    assert shown["meta"]["extractor"] == load_feature_extractor(f"featurenet:{tmp_path / 'f.pt'}").name
