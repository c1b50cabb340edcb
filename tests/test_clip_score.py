"""CLIP score from a local CLIP folder: a tiny random CLIPModel saved here, checked against the formula by hand."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from helpers.clip import MAX_POSITIONS, clip_folder
from nit_lightning.evaluation.clip_score import ClipScorer, score_sample_folder
from nit_lightning.evaluation.sample_prompts import read_sample_prompts

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return clip_folder(tmp_path_factory.mktemp("clip"))


def images_and_prompts():
    rng = np.random.default_rng(0)
    sizes = [(40, 72), (96, 32), (32, 32), (64, 48), (50, 50)]  # native sizes and aspect ratios, none CLIP's 32²
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    prompts = ["a red triangle", "a small blue ring", "an orange disc", "a cat on the table", "green"]
    return images, prompts


def by_hand(folder, images, prompts):
    """mean_i max(cos(image_features_i, text_features_i), 0) straight from the model's two feature functions."""
    model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder, local_files_only=True)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            ids = processor.tokenizer([prompt], truncation=True, max_length=MAX_POSITIONS, return_tensors="pt")
            i, t = model.get_image_features(pixel_values=pixels), model.get_text_features(**ids)
            i, t = (getattr(x, "pooler_output", x).double()[0] for x in (i, t))
            scores.append(max(float(i @ t / (i.norm() * t.norm())), 0.0))
    return np.array(scores)


def test_score_equals_the_formula_by_hand_at_any_batch_size(clip_dir):
    images, prompts = images_and_prompts()
    expected = by_hand(clip_dir, images, prompts)
    assert (expected > 0).any()
    for batch_size in (1, 2, 64):  # one image at a time or all together: the same numbers (to float32 rounding)
        result = ClipScorer(clip_dir, batch_size=batch_size).score(images, prompts)
        np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-6)  # float32 model, cosines in [-1, 1]
    summary = result.summary()
    assert summary["clip_score"] == pytest.approx(result.scores.mean(), rel=1e-12)
    assert summary["clip_score_x100"] == pytest.approx(100 * result.scores.mean(), rel=1e-12)
    assert summary["clip_score_stderr"] == pytest.approx(result.scores.std(ddof=1) / np.sqrt(5), rel=1e-12)
    assert summary["clip_score_n"] == 5 and summary["clip_prompts_truncated"] == 0


def test_negative_cosines_count_as_zero(clip_dir):
    scorer = ClipScorer(clip_dir)
    images, prompts = images_and_prompts()
    cos = (scorer.image_embeddings(images) * scorer.text_embeddings(prompts)[0]).sum(-1).numpy()
    np.testing.assert_allclose(scorer.score(images, prompts).scores, np.maximum(cos, 0), rtol=1e-12)


def test_long_prompts_are_truncated_and_counted(clip_dir, caplog):
    scorer = ClipScorer(clip_dir)
    images, _ = images_and_prompts()
    long = "a small red triangle on the table a blue ring"  # 10 words: <bos> + 6 + <eos> fit in 8 positions
    with caplog.at_level(logging.WARNING):
        result = scorer.score(images[:3], [long, "a red disc", long])
    assert result.truncated == 2 and result.summary()["clip_prompts_truncated"] == 2
    assert "2 of 3 prompts were longer than CLIP's 8 tokens" in caplog.text
    # Cut to its first 6 words with the end-of-text token kept: the same score as those words written out.
    cut = scorer.score(images[:1], ["a small red triangle on the"]).scores
    np.testing.assert_allclose(result.scores[:1], cut, rtol=0, atol=1e-6)


def test_sample_folder_and_its_prompts(clip_dir, tmp_path):
    from PIL import Image

    images, prompts = images_and_prompts()
    folder = tmp_path / "samples"
    folder.mkdir()
    lines = []
    for k, (image, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(image).save(folder / f"{k:05d}.png")
        lines.append(json.dumps({"file": f"{k:05d}.png", "prompt": prompt, "height": image.shape[0],
                                 "width": image.shape[1], "seed": k, "coco_id": 42 + k}))  # unknown keys: read past
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    result = score_sample_folder(folder, ClipScorer(clip_dir), batch_size=2)
    assert result["clip_score"] == pytest.approx(by_hand(clip_dir, images, prompts).mean(), abs=1e-6)
    assert result["clip_model"]["path"] == str(clip_dir) and len(result["clip_model"]["sha256"]) == 64

    def expect(kind, message):
        with pytest.raises(kind, match=message) as info:
            read_sample_prompts(folder)
        assert "\n" not in str(info.value)

    Image.fromarray(images[0]).save(folder / "extra.png")
    expect(ValueError, "1 images of .* have no line in prompts.jsonl \\(e.g. 'extra.png'\\)")
    (folder / "extra.png").unlink()
    (folder / "prompts.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n")
    expect(ValueError, "prompts.jsonl:2 lists '00000.png' a second time")
    (folder / "prompts.jsonl").write_text(lines[0] + "\n{bad\n")
    expect(ValueError, "prompts.jsonl:2 is not JSON")
    (folder / "prompts.jsonl").write_text(json.dumps({"file": "00000.png"}) + "\n")
    expect(ValueError, "prompts.jsonl:1 needs a string \"file\" and a string \"prompt\"")
    (folder / "prompts.jsonl").write_text(json.dumps({"file": "gone.png", "prompt": "a"}) + "\n")
    expect(FileNotFoundError, "1 images listed in .* are not in the folder \\(e.g. 'gone.png'\\)")
    (folder / "prompts.jsonl").unlink()
    expect(FileNotFoundError, "prompts.jsonl' not found: the CLIP score needs the prompt of every image")


def test_missing_or_incomplete_folder_is_one_line(clip_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(clip_dir, folder)

    def expect(kind, message, path=folder):
        with pytest.raises(kind, match=message) as info:
            ClipScorer(path)
        assert "\n" not in str(info.value), str(info.value)

    expect(FileNotFoundError, "CLIP model folder .*absent' not found; --clip-model DIR needs .*never downloads",
           tmp_path / "absent")
    weights = folder / "model.safetensors"
    weights.rename(tmp_path / "weights.bak")
    expect(FileNotFoundError, "CLIP model folder .* has no weights")
    (tmp_path / "weights.bak").rename(weights)
    processor = next(p for p in folder.iterdir() if p.name.endswith("processor_config.json"))
    processor.rename(tmp_path / "processor.bak")
    expect(FileNotFoundError, "has no preprocessor_config.json or processor_config.json")
    (tmp_path / "processor.bak").rename(processor)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2  # weights for 1 layer only
    (folder / "config.json").write_text(json.dumps(config))
    expect(ValueError, "lacks weights for .* parameters")
    (folder / "config.json").write_text("{not json")
    expect(ValueError, "could not be loaded by transformers")
    monkeypatch.setitem(sys.modules, "transformers", None)
    expect(ValueError, "needs the transformers package")
