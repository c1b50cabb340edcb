"""`python -m nit_lightning tinytext`: make the tiny word-level text encoder behind `tinytext:PATH` (data/tinytext.py)
from the captions it will read: its vocabulary is every word of them, its weights random and seeded (frozen)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.data.tinytext import TinyTextConfig, make_tiny_text_encoder, save_tiny_text_encoder


def build_parser() -> argparse.ArgumentParser:
    config = TinyTextConfig()
    parser = make_parser("tinytext", "make a tiny text encoder whose vocabulary is every word of the given captions; "
                                     "use the file as model.text_encoder: tinytext:FILE")
    parser.add_argument("--captions", required=True, action="append",
                        help="a captions JSONL ({caption} or {prompt} per line), a text file (one caption per line) "
                             "or a folder of .txt captions; repeat to add more")
    parser.add_argument("--out", required=True, help="output .pt (config, vocabulary, weights)")
    parser.add_argument("--dim", type=int, default=config.dim, help="width of the caption tokens")
    parser.add_argument("--max-length", type=int, default=config.max_length, help="words per prompt (more: truncated)")
    parser.add_argument("--layers", type=int, default=config.layers, help="transformer layers")
    parser.add_argument("--heads", type=int, default=config.heads, help="attention heads")
    parser.add_argument("--seed", type=int, default=config.seed, help="seed of the random weights")
    return parser


def read_texts(source: str) -> list[str]:
    """Captions from a JSONL (caption/prompt key), a plain text file (a line each) or a folder of .txt files."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"--captions {source}: the folder has no .txt caption files")
        return [f.read_text(encoding="utf-8").strip() for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"--captions {source} does not exist")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                texts.append(str(row["caption"] if "caption" in row else row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{source}:{number}: not a JSON object with 'caption' or 'prompt' ({error})") from None
        else:
            texts.append(line)
    return texts


def _run(args: argparse.Namespace) -> int:
    texts = [text for source in args.captions for text in read_texts(source)]
    if not texts:
        raise ValueError(f"no captions in {args.captions}")
    config = TinyTextConfig(dim=args.dim, max_length=args.max_length, layers=args.layers, heads=args.heads,
                            seed=args.seed)
    encoder = make_tiny_text_encoder(texts, config)
    sha256 = save_tiny_text_encoder(encoder, args.out)
    print(json.dumps({"out": args.out, "text_encoder": f"tinytext:{args.out}", "captions": len(texts),
                      "vocabulary": len(encoder.vocabulary), "sha256": sha256}, indent=2))
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
