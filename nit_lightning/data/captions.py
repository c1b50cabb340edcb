"""Captioned image folders (NiT-T2I): each image's caption from a `.txt` beside it or from a JSONL manifest.

A captioned folder has no classes: every image under --input (recursively) is listed, with class 0. An image without
a caption is skipped and counted ("no-caption"), or kept with the empty caption when asked; never dropped silently.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from nit_lightning.data.listing import Listing, file_identity, is_image, walk_input

log = logging.getLogger(__name__)

BESIDE = "beside"
CAPTION_SUFFIX = ".txt"  # beside: `photo.jpg` -> `photo.txt`
MISSING_CAPTION = ("skip", "empty")
CAPTIONS_HELP = ("captions of a captioned (text-to-image) folder: 'beside' (photo.jpg -> photo.txt beside it) or a "
                 "JSONL manifest PATH, one {\"file\": path relative to the manifest's folder, \"caption\": text} per "
                 "line (default: none, class-conditional)")


def caption_kind(captions: str | None) -> str | None:
    """What index.json records as "captions": "beside", "manifest", or None for a class-conditional folder."""
    if captions is None:
        return None
    return BESIDE if captions == BESIDE else "manifest"


def read_manifest(path: str | Path, input_dir: str | Path) -> tuple[dict[str, tuple[str, int]], int]:
    """JSONL `{"file", "caption"}` lines -> ({path relative to input_dir: (caption, line)}, entries outside input_dir).

    `file` is relative to the manifest's own folder (as Hugging Face's metadata.jsonl; the synthetic set's
    captions.jsonl lies at the set's top, its files in train/ val/ heldout/), or absolute. Entries of other folders
    (another split) are not this input's and are only counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {path}: no such manifest file (or pass --captions beside for .txt files)")
    base, root = path.resolve().parent, Path(input_dir).resolve()
    found: dict[str, tuple[str, int]] = {}
    outside = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}); each line must be "
                             f"{{\"file\": relative path, \"caption\": text}}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("caption"), str):
            raise ValueError(f"{path}:{number}: needs the string keys \"file\" and \"caption\", got {raw.strip()[:80]!r}")
        rel = os.path.relpath(os.path.normpath(base / entry["file"]), root)
        if rel == ".." or rel.startswith(".." + os.sep):
            outside += 1
            continue
        rel = Path(rel).as_posix()
        caption = entry["caption"].strip()
        if rel in found and found[rel][0] != caption:
            raise ValueError(f"{path}:{number}: {entry['file']!r} has two captions (the other on line "
                             f"{found[rel][1]}): keep one line per image")
        found[rel] = (caption, number)
    return found, outside


def read_beside(image: Path) -> tuple[str | None, str]:
    """(caption, why it is missing) from `photo.txt` beside `photo.jpg`; an unreadable file raises UnicodeDecodeError."""
    text_file = image.with_suffix(CAPTION_SUFFIX)
    if not text_file.is_file():
        return None, f"no {text_file.name} beside it"
    return text_file.read_text(encoding="utf-8-sig").strip(), f"{text_file.name} is empty"


def list_captioned_images(input_dir: str | Path, captions: str, missing: str = "skip") -> Listing:
    """Every image under input_dir with its caption (Listing.captions, in item order), class 0, no class names."""
    if missing not in MISSING_CAPTION:
        raise ValueError(f"--missing-caption {missing!r} must be one of {', '.join(MISSING_CAPTION)}")
    root, files, skipped = walk_input(input_dir)
    images = [p for p in files if is_image(p)]
    manifest: dict[str, tuple[str, int]] = {}
    if captions != BESIDE:
        manifest, outside = read_manifest(captions, root)
        if outside and not manifest:  # a common slip: paths relative to --input, not to the manifest
            raise ValueError(f"none of the {outside} entries of {captions} lies under --input {root}: their \"file\" "
                             f"paths are relative to the manifest's folder {Path(captions).resolve().parent}")
        if outside:
            log.info("%d entries of %s lie outside %s (other splits): not used", outside, captions, root)
    used: set[Path] = set()  # caption files that belong to an image are data, not ignored noise
    items, identity, texts, empty = [], [], [], 0
    for path in images:
        rel = path.relative_to(root).as_posix()
        if captions == BESIDE:
            try:
                text, why = read_beside(path)
            except (UnicodeDecodeError, OSError) as error:
                skipped.append({"source": rel, "reason": "unreadable-caption",
                                "detail": f"{path.with_suffix(CAPTION_SUFFIX).name}: {error}"})
                continue
            if text is not None:
                used.add(path.with_suffix(CAPTION_SUFFIX))
        else:
            text, line = manifest.pop(rel, (None, 0))
            why = f"empty caption on {Path(captions).name}:{line}" if text is not None else f"not in {captions}"
        if not text:  # none, or empty after stripping: the same for training (the null caption), so counted alike
            if missing == "skip":
                skipped.append({"source": rel, "reason": "no-caption", "detail": why})
                continue
            text, empty = "", empty + 1
        items.append((rel, 0))
        identity.append(file_identity(path))
        texts.append(text)
    for rel, (_, line) in sorted(manifest.items()):  # listed, but not an image of this folder
        skipped.append({"source": rel, "reason": "missing-file", "detail": f"{captions}:{line}, not an image in {root}"})
    ignored = [p.relative_to(root).as_posix() for p in files if not is_image(p) and p not in used]
    return Listing(items, [], skipped, ignored, identity, captions=texts, empty_captions=empty)
