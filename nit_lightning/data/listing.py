"""Image folders: which files are images, in which order, with which labels (ImageNet-style or flat + labels file)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from nit_lightning.records.names import WEIGHTS_DOCS

# Every reader of image folders (prepare, reference statistics, sample folders, the demo feature nets) uses this list.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif")


@dataclass
class Listing:
    """The sorted work list: (relative path, class) per image, class names, and what was left out at listing time."""

    items: list[tuple[str, int]]
    classes: list[str]
    skipped: list[dict[str, str]]  # {"source", "reason", "detail"}: no-label, missing-file, no-class-folder,
    # no-caption, unreadable-caption
    ignored: list[str]  # files that are not images by extension (e.g. synth.json)
    identity: list[tuple[int, int]] = field(default_factory=list)  # (size in bytes, mtime in ns) per item
    captions: list[str] | None = None  # per item, for a captioned folder (data/captions.py); None: class-conditional
    empty_captions: int = 0  # items kept with the empty caption (--missing-caption empty)

    def digest(self) -> str:
        """SHA-1 of the work list; the caption text is part of it (changed captions refuse a resume like changed
        labels). Without captions it is the digest of the items alone, as before captions existed."""
        content = self.items if self.captions is None else [self.items, self.captions]
        return hashlib.sha1(json.dumps(content).encode()).hexdigest()

    def files_digest(self) -> str:
        """SHA-1 over (path, size, mtime) of every item: another folder with the same names, or files rewritten in
        place, give another digest; the same files moved or copied with their times (mv, rsync -a) give the same."""
        rows = [[rel, *ident] for (rel, _), ident in zip(self.items, self.identity, strict=True)]
        return hashlib.sha1(json.dumps(rows).encode()).hexdigest()


def file_identity(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file: what tells one version of it from another without reading it."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def is_image(path: Path) -> bool:
    """By extension; what PIL cannot read after all is skipped and counted where it is decoded."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def sorted_files(directory: Path, loops: list[str] | None = None) -> list[Path]:
    """All files under a directory, sorted by their POSIX relative path (never listdir order). Links to directories
    are followed like directories (a class folder may be a link); a link back to a folder it lies in would list
    forever: it is left out, and its relative path appended to `loops` when given."""
    found: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                stat = entry.stat()  # follows the link: the real folder
                real = (stat.st_dev, stat.st_ino)
                if real in ancestors:
                    if loops is not None:
                        loops.append(entry.relative_to(directory).as_posix())
                    continue
                walk(entry, ancestors | {real})
            elif entry.is_file():
                found.append(entry)

    root = directory.stat()
    walk(directory, frozenset({(root.st_dev, root.st_ino)}))
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def read_labels(labels_file: str | Path) -> dict[str, str]:
    """`filename<TAB or comma>class` per line ('#' comments and blank lines allowed) -> {filename: class}."""
    labels: dict[str, str] = {}
    for number, raw in enumerate(Path(labels_file).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, cls = line.partition("\t") if "\t" in line else line.rpartition(",")
        if not sep or not name.strip() or not cls.strip():
            raise ValueError(f"{labels_file}:{number}: {raw!r} is not 'filename<TAB or comma>class'")
        name, cls = name.strip(), cls.strip()
        if labels.get(name, cls) != cls:
            raise ValueError(f"{labels_file}:{number}: {name!r} has two labels, {labels[name]!r} and {cls!r}")
        labels[name] = cls
    return labels


def walk_input(input_dir: str | Path) -> tuple[Path, list[Path], list[dict[str, str]]]:
    """`prepare --input`: (root, every file sorted, the symlink loops left out as skipped entries)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} is not a directory (ImageNet's layout and recipe: {WEIGHTS_DOCS})")
    loops: list[str] = []
    files = sorted_files(root, loops)
    skipped: list[dict[str, str]] = [{"source": rel, "reason": "symlink-loop", "detail": "a link to a folder that "
                                      "contains it; its files are listed through the folder itself"} for rel in loops]
    return root, files, skipped


def list_labelled_images(input_dir: str | Path, labels_file: str | Path | None = None) -> Listing:
    """ImageNet-style folder (class = index of the sorted sub-folder names) or a flat folder plus a labels file."""
    root, files, skipped = walk_input(input_dir)
    ignored = [p.relative_to(root).as_posix() for p in files if not is_image(p)]
    images = [p for p in files if is_image(p)]
    if labels_file is not None:
        labels = read_labels(labels_file)
        names = [str(v) for v in labels.values()]
        if all(n.lstrip("-").isdigit() for n in names):  # integer labels are used as given
            if any(int(n) < 0 for n in names):
                raise ValueError(f"labels file {labels_file} has a negative class index")
            classes = [str(i) for i in range(max((int(n) for n in names), default=-1) + 1)]
            index = {n: int(n) for n in names}
        else:  # class names: index = position among the sorted names, as for folders
            classes = sorted(set(names))
            index = {n: i for i, n in enumerate(classes)}
        items, identity = [], []
        present = set()
        for path in images:
            rel = path.relative_to(root).as_posix()
            name = rel if rel in labels else path.name
            present.add(name)
            if name in labels:
                items.append((rel, index[labels[name]]))
                identity.append(file_identity(path))
            else:
                skipped.append({"source": rel, "reason": "no-label", "detail": f"not in {labels_file}"})
        for name in sorted(set(labels) - present):
            skipped.append({"source": name, "reason": "missing-file", "detail": f"listed in {labels_file}, not in {root}"})
        return Listing(items, classes, skipped, ignored, identity)
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders; for a flat folder pass --labels FILE (filename<TAB>class)")
    class_index = {name: i for i, name in enumerate(class_dirs)}
    items, identity = [], []
    for path in images:
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            skipped.append({"source": rel.as_posix(), "reason": "no-class-folder", "detail": "image at the top level"})
            continue
        items.append((rel.as_posix(), class_index[rel.parts[0]]))
        identity.append(file_identity(path))
    return Listing(items, class_dirs, skipped, ignored, identity)


def list_images(root: str | Path) -> list[Path]:
    """Every image under `root` (recursive), sorted by relative path; an error when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist (ImageNet's layout and recipe: {WEIGHTS_DOCS})")
    files = [p for p in sorted_files(root) if is_image(p)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    return files
