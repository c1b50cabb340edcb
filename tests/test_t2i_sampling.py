"""NiT-T2I sampling: guidance with the null caption, packed prompts equal prompts one at a time, the T2I checkpoint
round trip through load_pipeline, and `sample --prompts` (files, errors, resume)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nit_lightning.data.codecs import PixelCodec
from nit_lightning.data.tinytext import TinyTextConfig, make_tiny_text_encoder, save_tiny_text_encoder
from nit_lightning.diffusion.guidance import GuidedModel
from nit_lightning.generation.images import ImageRequest, generate
from nit_lightning.generation.pipeline import NetModelFn, load_pipeline
from nit_lightning.generation.prompts import prompt_requests, read_prompts
from nit_lightning.generation.settings import SamplerSettings
from nit_lightning.models import build_nit_t2i
from nit_lightning.models.text import PackedText
from nit_lightning.records.checkpoint import CheckpointMeta, store_ema_weights
from tests.helpers.fit import run_command

PROMPTS = ["a red disc", "a blue ring", "green stripes", "a small white cross"]


def random_t2i_net(text_dim: int = 16, seed: int = 0):
    """NiT-T2I-debug on PixelCodec(2) latents (12 channels) with N(0, 0.1) weights (an untrained net predicts 0)."""
    torch.manual_seed(seed)
    net = build_nit_t2i("NiT-T2I-debug", in_channels=12, text_dim=text_dim, attn_backend="loop")
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net.eval()


def write_t2i_checkpoint(folder: Path) -> Path:
    """A checkpoint as NiTModule writes one for NiT-T2I: nit_meta (conditioning text + encoder), live and EMA weights."""
    encoder = make_tiny_text_encoder(PROMPTS, TinyTextConfig(dim=16))
    save_tiny_text_encoder(encoder, folder / "tinytext.pt")
    net = random_t2i_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    checkpoint = {"state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": 3}
    store_ema_weights(checkpoint, state)
    CheckpointMeta(net_config=dataclasses.asdict(net.config), codec=PixelCodec(2).describe(), step=3,
                   conditioning="text", text_encoder=encoder.describe(),
                   sampling={"sampler": {"method": "euler", "steps": 3, "cfg_scale": 2.0, "cfg_interval": [0.0, 0.9]},
                             "trained_tokens": None}).store(checkpoint, folder)
    path = folder / "t2i.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_t2i_checkpoint(tmp_path)


def test_guidance_with_captions_is_the_cfg_formula_over_the_null_caption():
    torch.manual_seed(0)
    net = random_t2i_net().double()
    hw = torch.tensor([[2, 3], [3, 2]])
    x = torch.randn(12, 12, dtype=torch.float64)
    text = PackedText(torch.randn(5, 16, dtype=torch.float64), torch.tensor([2, 3]))
    guided = GuidedModel(NetModelFn(net), cfg_scale=3.0, cfg_interval=(0.0, 1.0), model_dtype=torch.float64, text=True)
    v = guided(x, 0.5, text, hw)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        v_c = net(x, t, text, hw)
        v_u = net(x, t, net.null_text(2).to(dtype=torch.float64), hw)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=1e-12, atol=1e-12)
    assert guided.tokens == 24  # both branches in one packed call


def test_packed_prompts_equal_prompts_sampled_one_at_a_time(ckpt: Path):
    pipe = load_pipeline(ckpt)
    assert pipe.conditioning == "text" and pipe.meta["text_encoder"]["type"] == "tinytext"
    sampler = SamplerSettings(method="heun", steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.9))
    requests = [ImageRequest(i, size, 0, 100 + i, prompt=PROMPTS[i % 4])
                for i, size in enumerate([(8, 8), (8, 12), (12, 8), (8, 8), (4, 16)])]
    packed = {r.index: img for b in generate(pipe, requests, sampler, tokens_per_forward=4096)
              for r, img in zip(b.requests, b.images)}
    for r in requests:
        alone = next(iter(generate(pipe, [r], sampler))).images[0]
        assert torch.equal(packed[r.index], alone), r
    assert not torch.equal(packed[0], packed[3]) or requests[0].seed == requests[3].seed


def test_changing_one_prompt_leaves_the_other_images_unchanged(ckpt: Path):
    pipe = load_pipeline(ckpt)
    sampler = SamplerSettings(method="euler", steps=2, cfg_scale=2.0)
    a = [ImageRequest(0, (8, 8), 0, 1, prompt=PROMPTS[0]), ImageRequest(1, (8, 8), 0, 2, prompt=PROMPTS[1])]
    b = [a[0], dataclasses.replace(a[1], prompt=PROMPTS[2])]
    first = [img for batch in generate(pipe, a, sampler) for img in batch.images]
    second = [img for batch in generate(pipe, b, sampler) for img in batch.images]
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])


def test_a_class_request_on_a_text_pipeline_and_back_are_refused(ckpt: Path):
    pipe = load_pipeline(ckpt)
    with pytest.raises(ValueError, match="no prompt"):
        next(iter(generate(pipe, [ImageRequest(0, (8, 8), 0, 1)], SamplerSettings(steps=1))))


def test_prompt_files_plain_and_jsonl(tmp_path: Path):
    plain = tmp_path / "p.txt"
    plain.write_text("a red disc\n  a blue ring \n\n")
    assert [s.prompt for s in read_prompts(plain)] == ["a red disc", "a blue ring"]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a red disc", "height": 16, "width": 8, "seed": 5, "coco_id": 9}\n'
                    '{"prompt": "a blue ring"}\n')
    specs = read_prompts(rows)
    assert specs[0].size == (16, 8) and specs[0].seed == 5 and specs[0].meta == {"coco_id": 9}
    requests = prompt_requests(specs, [(8, 8), (16, 16)], per_prompt=2, seed=0, multiple=2)
    assert [(r.prompt, r.size, r.index) for r in requests][:3] == [("a red disc", (16, 8), 0), ("a red disc", (16, 8), 1),
                                                                    ("a blue ring", (8, 8), 2)]
    assert [r.seed for r in requests[:2]] == [5, 6] and len(requests) == 6


@pytest.mark.parametrize("content, message", [
    ("a red disc\n\na blue ring\n", "p.txt:2: empty line"),
    ('{"prompt": "a red disc"}\n{"prompt": \n', "p.txt:2: not valid JSON"),
    ('{"prompt": "a red disc", "height": 16}\n', "give both 'height' and 'width'"),
    ('{"prompt": "a red disc", "height": -16, "width": 8}\n', "positive integers"),
    ('{"prompt": "a red disc", "height": 15, "width": 8}\n', "p.txt:1: size 15x8"),
    ('{"text": "a red disc"}\n', "'prompt' must be a non-empty string"),
])
def test_prompts_file_errors_are_one_line_and_exit_2(ckpt: Path, tmp_path: Path, capsys, content: str, message: str):
    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    code = run_command(["sample", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                        "--sizes", "8x8", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_sample_prompts_writes_pngs_and_prompts_jsonl_and_resumes(ckpt: Path, tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "height": 8, "width": 16, "seed": 7, "id": "x"}]))
    out = tmp_path / "out"
    argv = ["sample", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--sizes", "8x8,16x8",
            "--no-progress"]
    assert run_command(argv) == 0
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["height"], r["width"]) for r in rows] == [
        ("000000.png", PROMPTS[0], 8, 8), ("000001.png", PROMPTS[0], 16, 8), ("000002.png", PROMPTS[1], 8, 16)]
    assert rows[2]["seed"] == 7 and rows[2]["meta"] == {"id": "x"}
    assert (out / "grid.png").is_file() and (out / "done.json").is_file()
    first = (out / "000001.png").read_bytes()
    (out / "000001.png").unlink()
    assert run_command(argv) == 0  # resume: the missing image is made again, bit for bit
    assert (out / "000001.png").read_bytes() == first
    capsys.readouterr()
    assert run_command(argv[:-1] + ["--seed", "3", "--no-progress"]) == 2  # other settings: refused
    assert "seed" in capsys.readouterr().err


def test_prompts_need_a_text_checkpoint_and_a_text_checkpoint_needs_prompts(ckpt: Path, tmp_path: Path, capsys):
    from tests.helpers.nets import random_debug_net, write_lightning_checkpoint

    c2i = write_lightning_checkpoint(tmp_path / "c2i.ckpt", random_debug_net())
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red disc\n")
    assert run_command(["sample", "--ckpt", str(c2i), "--prompts", str(prompts), "--sizes", "8x8",
                        "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert run_command(["sample", "--ckpt", str(ckpt), "--sizes", "8x8", "--out", str(tmp_path / "b"),
                        "--no-progress"]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_prompt_grid_is_labelled_by_prompt(ckpt: Path, tmp_path: Path):
    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert run_command(["sample", "--ckpt", str(ckpt), "--prompts", str(prompts), "--sizes", "8x8,8x16",
                        "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    grid = np.asarray(Image.open(tmp_path / "o" / "grid.png"))
    assert grid.shape[1] > 4 * 16 and grid.shape[0] > 2 * 8  # four prompt columns, two size rows
