"""The small T2I commands: `synth --captioned` and `tinytext` (its caption sources and their errors)."""
from __future__ import annotations

import json
from pathlib import Path

from helpers.fit import run_command
from nit_lightning.data.tinytext import load_tiny_text_encoder


def test_synth_captioned_then_tinytext_from_each_kind_of_source(tmp_path: Path, capsys):
    images = tmp_path / "images"
    assert run_command(["synth", "--captioned", "--out", str(images), "--num-images", "12", "--max-side", "48",
                        "--held-out-images", "3"]) == 0
    manifest = json.loads((images / "synth.json").read_text())
    assert manifest["counts"] == {"train": 12, "heldout": 3} and manifest["held_out"]
    rows = [json.loads(line) for line in (images / "captions.jsonl").read_text().splitlines()]
    assert all((images / r["file"]).with_suffix(".txt").read_text().strip() == r["caption"] for r in rows)
    words = {w for r in rows for w in r["caption"].split()}
    for source in (images / "captions.jsonl", images):  # a manifest, a folder of .txt captions
        out = tmp_path / f"tt_{source.name}.pt"
        assert run_command(["tinytext", "--captions", str(source), "--out", str(out), "--dim", "8", "--heads", "2"]) == 0
        encoder = load_tiny_text_encoder(out)
        assert set(encoder.vocabulary) == words and encoder.dim == 8
    plain = tmp_path / "prompts.txt"
    plain.write_text("a red disc\n\na blue ring\n")
    assert run_command(["tinytext", "--captions", str(plain), "--out", str(tmp_path / "p.pt")]) == 0
    assert set(load_tiny_text_encoder(tmp_path / "p.pt").vocabulary) == {"a", "red", "disc", "blue", "ring"}


def test_tinytext_errors_are_one_line(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a red disc"}\n{"file": "x.png"}\n')
    for argv, message in (([str(bad)], "bad.jsonl:2"), ([str(tmp_path / "none")], "does not exist"),
                          ([str(tmp_path)], "no .txt caption files")):
        capsys.readouterr()
        assert run_command(["tinytext", "--captions", *argv, "--out", str(tmp_path / "t.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
