"""One sampler/sweep schema: SamplerSettings checks, sweep files (defaults, aliases, notes), and the repo's sweeps."""
from __future__ import annotations

from pathlib import Path

import pytest

from nit_lightning.generation.settings import SamplerSettings, SizeSetting, load_sweep, parse_interval

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"
# SPEC §7: NiT-XL's published per-resolution settings (method, steps, cfg, interval) and FID.
SPEC_TABLE = {
    "256x256": ("sde", 250, 2.25, (0.0, 0.7), 2.16), "512x512": ("sde", 250, 2.05, (0.0, 0.7), 1.57),
    "768x768": ("euler", 50, 3.0, (0.0, 0.7), 4.05), "1024x1024": ("euler", 50, 3.0, (0.0, 0.8), 4.52),
    "1536x1536": ("euler", 50, 3.5, (0.0, 0.9), 6.51), "2048x2048": ("euler", 50, 4.5, (0.0, 0.9), 24.76),
    "320x960": ("euler", 50, 4.0, (0.0, 0.9), 16.85), "416x768": ("euler", 50, 2.75, (0.0, 0.7), 4.11),
    "480x640": ("euler", 50, 2.75, (0.0, 0.7), 3.72), "640x480": ("euler", 50, 2.5, (0.0, 0.7), 3.41),
    "768x416": ("euler", 50, 2.85, (0.0, 0.7), 5.27), "960x320": ("euler", 50, 4.5, (0.0, 0.9), 9.90),
}


def test_sampler_settings_check_every_field():
    s = SamplerSettings(method="sde", steps=250, cfg_scale=2.25, cfg_interval=[0, 0.7])
    assert s.cfg_interval == (0.0, 0.7) and s.guided and s.describe() == "sde 250, cfg 2.25 in [0, 0.7]"
    assert SamplerSettings.from_dict(s.as_dict()) == s
    assert SamplerSettings.from_dict({"cfg": 2.0, "interval": "0,0.5"}).cfg_interval == (0.0, 0.5)
    bad = {"method 'ddim'": dict(method="ddim"), "steps=0": dict(steps=0), "integer >= 2 for sde": dict(method="sde", steps=1),
           "not a finite number": dict(cfg_scale=float("inf")), "precision 'fp8'": dict(precision="fp8"),
           "integration_dtype 'float16'": dict(integration_dtype="float16"), "lo <= hi": dict(cfg_interval=(0.8, 0.2))}
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message):
            SamplerSettings(**kwargs)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stpes'\]"):
        SamplerSettings.from_dict({"stpes": 10})
    assert parse_interval("[0, 0.7]") == (0.0, 0.7)


def test_sweep_file_defaults_aliases_notes_and_errors(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: toy\ndefaults: {steps: 10}\nsettings:\n"
                    "  - {size: 64x32, cfg: 2.0, interval: [0, 0.7], published: {fid: 1.5}}\n"
                    "  - {size: 32x64, method: heun}\n")
    sweep = load_sweep(path)
    a, b = sweep.settings
    assert sweep.name == "toy" and a.size == (64, 32) and a.published == {"fid": 1.5}
    assert a.sampler == SamplerSettings(steps=10, cfg_scale=2.0, cfg_interval=(0.0, 0.7))
    assert b.sampler == SamplerSettings(method="heun", steps=10)
    assert [s.name for s in sweep.select(["32x64"]).settings] == ["32x64"]
    with pytest.raises(ValueError, match=r"sizes \['16x16'\] are not in the sweep"):
        sweep.select(["16x16"])
    path.write_text("- {size: 64x32, steps: 5}\n")  # a bare list is the settings
    assert load_sweep(path).settings == (SizeSetting((64, 32), SamplerSettings(steps=5)),)
    for text, message in (("settings:\n  - {size: 64x32, method: dpm}\n", "method 'dpm'"),
                          ("settings:\n  - {size: 64x32, seed: 3}\n", r"unknown key\(s\) \['seed'\]"),
                          ("settings:\n  - {size: 8x8}\n  - {size: 8x8}\n", "more than once"),
                          ("settings: []\n", "non-empty"), ("sizes: [8x8]\n", "non-empty")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_sweep(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_repo_sweep_files_carry_the_spec_table():
    """experiments/sweeps/*.yaml are the one place of the published settings; they agree with SPEC §7."""
    resolution, aspect = load_sweep(SWEEPS / "resolution.yaml"), load_sweep(SWEEPS / "aspect_ratio.yaml")
    assert [s.name for s in resolution.settings] == list(SPEC_TABLE)[:6]
    assert [s.name for s in aspect.settings] == list(SPEC_TABLE)[6:]
    for setting in resolution.settings + aspect.settings:
        method, steps, cfg, interval, fid = SPEC_TABLE[setting.name]
        assert setting.sampler == SamplerSettings(method, steps, cfg, interval), setting.name
        assert setting.published["fid"] == fid


def test_auto_precision_is_bf16_on_cuda_and_fp32_elsewhere():
    auto = SamplerSettings()
    assert auto.precision == "auto"
    assert auto.for_device("cpu").precision == "float32" and auto.for_device("cuda:0").precision == "bfloat16"
    assert SamplerSettings(precision="float32").for_device("cuda").precision == "float32"  # an explicit choice stays
