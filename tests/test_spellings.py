"""One spelling per setting (issue 18): the flags and keys renamed when every setting got one name are refused in one
line naming the new spelling, and dtypes are torch's names (`bf16` is refused naming `bfloat16`), on the command line
and in sweep files."""
from __future__ import annotations

import pytest

from helpers.fit import run_command as main


def exit_code(argv: list[str]) -> int:
    """The command's exit code; argparse's own errors stop with SystemExit(2)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


def error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"python -m nit_lightning {prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, prog, says", [
    (["sample", "--ckpt", "c.ckpt", "--dtype", "float64"], "sample", "--integration-dtype"),
    (["sample", "--ckpt", "c.ckpt", "--tokens-per-pack", "4096"], "sample", "--tokens-per-forward"),
    (["sweep", "--sweep", "s.yaml", "--ckpt", "c.ckpt", "--tokens-per-pack", "4096"], "sweep", "--tokens-per-forward"),
    (["prepare", "--input", "i", "--output", "o", "--dtype", "float16"], "prepare", "--latent-dtype"),
    (["evaluate", "--samples", "s", "--ref", "r.npz", "--dtype", "float64"], "evaluate", "--feature-dtype"),
])
def test_a_renamed_flag_is_refused_naming_the_new_one(argv, prog, says, capsys):
    assert exit_code(argv) == 2
    assert says in error_line(capsys, prog)


@pytest.mark.parametrize("argv, prog", [
    (["sample", "--ckpt", "c.ckpt", "--integration-dtype", "fp64"], "sample"),
    (["prepare", "--input", "i", "--output", "o", "--latent-dtype", "bf16"], "prepare"),
    (["prepare", "--input", "i", "--output", "o", "--codec-dtype", "bf16"], "prepare"),
    (["evaluate", "--samples", "s", "--ref", "r.npz", "--feature-dtype", "fp64"], "evaluate"),
    (["sweep", "--sweep", "s.yaml", "--ckpt", "c.ckpt", "--pr-dtype", "fp32"], "sweep"),
])
def test_an_old_dtype_name_is_refused_naming_torchs(argv, prog, capsys):
    old = argv[-1]
    new = {"fp64": "float64", "bf16": "bfloat16", "fp32": "float32"}[old]
    assert exit_code(argv) == 2
    assert f"{old!r} is now spelled {new!r}" in error_line(capsys, prog)  # not argparse's bare "invalid choice"


def test_a_sweep_file_with_an_old_key_or_dtype_is_refused(tmp_path):
    from nit_lightning.generation.settings import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nsettings:\n  - {size: 64x64, method: euler, steps: 2, dtype: float64}\n")
    with pytest.raises(ValueError, match="'dtype' is now spelled 'integration_dtype'"):
        load_sweep(path)
    path.write_text("name: s\nsettings:\n  - {size: 64x64, method: euler, steps: 2, precision: bf16}\n")
    with pytest.raises(ValueError, match="'bf16' is now spelled 'bfloat16'"):
        load_sweep(path)


def test_bench_scripts_take_no_abbreviated_flags():
    """The benches print tables that are quoted in the docs: `--step 5` must not quietly mean `--steps 5`."""
    import ast
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    loose = []
    for path in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
                strict = any(k.arg == "allow_abbrev" and getattr(k.value, "value", True) is False for k in node.keywords)
                if not strict:
                    loose.append(f"{path.name}:{node.lineno}")
    assert not loose, f"argument parsers that accept abbreviations (add allow_abbrev=False): {loose}"
