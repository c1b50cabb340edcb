"""The package's folders are the data flow: every import points down the layers (lazy imports inside functions too).

    demo           the CPU end-to-end demo, over the commands and the library
    cli            argv -> settings -> one library call
    training       LightningModule, EMA, callbacks (the sample-grid and evaluation callbacks call generation)
    evaluation     Inception, metrics, references, sweeps (sweeps sample through generation)
    generation     checkpoint -> pipeline -> images (sample sets, sampler and sweep settings)
    data, diffusion    shards, codecs, packing, datamodule | flow-matching loss, samplers
    models, distributed, records, stop_signals    pure torch network | who-am-I for the commands | the contracts
                   between stages | signals caught at start
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nit_lightning"
LAYERS = {"records": 0, "models": 0, "distributed": 0, "stop_signals": 0, "data": 1, "diffusion": 1, "generation": 2,
          "evaluation": 3, "training": 4, "cli": 5, "demo": 6, "__main__": 7, "__init__": 0}


def part_of(module: str) -> str:
    """nit_lightning.data.shards -> "data"; nit_lightning.distributed -> "distributed"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every `nit_lightning` import in a file, wherever it stands."""
    here = "nit_lightning." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("nit_lightning")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("nit_lightning"):
                names = [f"{module}.{a.name}" for a in node.names] if module == "nit_lightning" else [module]
                found += [(node.lineno, name) for name in names]
    return found


def test_every_file_belongs_to_a_layer():
    parts = {part_of("nit_lightning." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts))
             for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYERS), f"folders without a layer: {sorted(parts - set(LAYERS))}; add them to LAYERS"


def test_no_upward_imports():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of("nit_lightning." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, module in imports_of(path):
            target = part_of(module)
            if target != source and LAYERS[target] >= LAYERS[source]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}) imports {module} ({target})")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["records", "models", "data", "diffusion", "generation", "evaluation", "training",
                                     "cli", "demo"])
def test_each_folder_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"nit_lightning/{package}/__init__.py needs a docstring saying what lives there"


def test_files_stay_small():
    """DESIGN: small files with one job. A file past 300 lines is doing two; split it along its jobs."""
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 300]
    assert not long, "files past 300 lines:\n" + "\n".join(long)
