"""End-to-end section of the GPU check: the user path on one GPU, each step a real command with its own time limit.

synth (<= 200 images of <= 256 px) -> prepare (DC-AE f32c32: the real weights when NIT_DCAE points at them, else one
built from its config with RANDOM weights, labelled "throughput only") -> `python -m nit_lightning fit --config
experiments/nit_b_ablation_native.yaml` on 1 GPU for ~60 steps (overrides only: data, devices, steps, logging) ->
`sample` on the GPU at the command's default pack size. Every result is appended to a JSON-lines file as soon as it
exists, so a killed run still leaves numbers; `summary()` reads them back for the table.

    python bench/gpu_e2e.py --work /tmp/e2e --out outputs/gpu_e2e.jsonl            # on the GPU machine
    python bench/gpu_e2e.py --tiny --device cpu --work /tmp/e2e --out e2e.jsonl     # the same path, CPU-sized (tests)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "nit_b_ablation_native.yaml"
FULL = dict(images=200, min_side=64, max_side=256, steps=60, window=20, samples=256, sample_steps=50, size="256x256",
            prepare_timeout=180, fit_timeout=240, sample_timeout=120)
TINY = dict(images=40, min_side=32, max_side=64, steps=6, window=2, samples=10, sample_steps=4, size="32x32",
            prepare_timeout=120, fit_timeout=240, sample_timeout=120)


def record(out: Path, section: str, **values: Any) -> dict[str, Any]:
    """Append one JSON line at once (flushed): what a killed run leaves behind."""
    row = {"section": section, "time": time.strftime("%H:%M:%S"), **values}
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"[e2e] {json.dumps(row)}", flush=True)
    return row


def run(argv: list[str], cwd: Path, timeout: float, log: Path) -> tuple[int, float, str]:
    """A `python -m nit_lightning ...` step in a subprocess: (exit code, seconds, output); a timeout is rc 124."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "nit_lightning", *argv], cwd=cwd, env=env, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        code, text = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        code, text = 124, (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) \
            else (expired.stdout or "")
    log.write_text(text)
    return code, time.perf_counter() - start, text


def make_dcae(work: Path) -> tuple[str, str]:
    """(codec spec, label): the real DC-AE when NIT_DCAE names it, else f32c32 from its config with random weights."""
    real = os.environ.get("NIT_DCAE")
    if real:
        return f"dcae:{real}", "real DC-AE weights"
    folder = work / "dcae-random"
    if not (folder / "config.json").is_file():
        from diffusers import AutoencoderDC

        AutoencoderDC(scaling_factor=0.41407).save_pretrained(folder)  # the f32c32 architecture, random weights
    return f"dcae:{folder}", "RANDOM DC-AE weights: throughput only"


def fit_config(work: Path, shards: Path, sizes: dict[str, Any], device: str, tiny: bool, epoch_tokens: int) -> Path:
    """experiments/nit_b_ablation_native.yaml with overrides only: data, one device, steps, CSV metrics every step."""
    config = yaml.safe_load(CONFIG.read_text())
    tokens = int(config["data"]["tokens_per_pack"])
    # Enough passes over the few images that every step gets a full pack: the raw-step figure uses full packs too.
    weight = max(1, -(-tokens * (sizes["steps"] + 5) // max(epoch_tokens, 1)))
    config["data"].update(sources=[{"path": str(shards), "weight": float(weight)}])
    config["trainer"].update(devices=1, strategy="auto", max_steps=sizes["steps"], log_every_n_steps=1,
                             accelerator="gpu" if device.startswith("cuda") else "cpu",
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(work / "logs"), "name": "fit", "version": ""}})
    for callback in config["trainer"]["callbacks"]:
        name = callback["class_path"].rsplit(".", 1)[-1]
        if name == "ThroughputMonitor":
            callback["init_args"] = {"window": sizes["window"]}
        if name == "ModelCheckpoint":
            callback["init_args"].update(dirpath=str(work / "checkpoints"), every_n_train_steps=sizes["steps"])
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "RichProgressBar" not in c["class_path"]]
    if tiny:  # the same recipe on a debug-sized net that a CPU runs in seconds
        config["model"]["net"] = {"name": "NiT-debug", "num_classes": 1000}
        config["data"].update(tokens_per_pack=256, num_workers=0)
        config["trainer"]["precision"] = "32-true"
    path = work / "fit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def last_logged(csv_path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each key in Lightning's CSVLogger metrics.csv."""
    found: dict[str, float] = {}
    if csv_path.is_file():
        with open(csv_path) as handle:
            for row in csv.DictReader(handle):
                found.update({k: float(row[k]) for k in keys if row.get(k) not in (None, "")})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--work", required=True, help="scratch folder (images, shards, logs, checkpoints, samples)")
    parser.add_argument("--out", required=True, help="JSON-lines file the results are appended to")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: pixel codec, NiT-debug, a few steps")
    parser.add_argument("--raw-tokens-per-s", type=float, default=None,
                        help="the raw train step's tokens/s for the same model and pack size (from gpu_check)")
    args = parser.parse_args(argv)
    sizes, work, out = (TINY if args.tiny else FULL), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0

    code, seconds, _ = run(["synth", "--out", str(work / "images"), "--num-images", str(sizes["images"]),
                            "--min-side", str(sizes["min_side"]), "--max-side", str(sizes["max_side"])], work, 120,
                           work / "synth.log")
    record(out, "e2e-synth", rc=code, seconds=round(seconds, 1), images=sizes["images"])
    codec, label = ("pixel:8", "pixel codec (tiny mode)") if args.tiny else make_dcae(work)
    shards = work / "shards"
    code, seconds, _ = run(["prepare", "--input", str(work / "images"), "--output", str(shards), "--codec", codec,
                            "--device", args.device, "--batch-size", "32", "--samples-per-shard", "100",
                            *([] if args.tiny else ["--codec-dtype", "bfloat16"])], work, sizes["prepare_timeout"],
                           work / "prepare.log")
    index = json.loads((shards / "index.json").read_text()) if (shards / "index.json").is_file() else {}
    written = int(index.get("num_samples", 0))
    record(out, "e2e-prepare", rc=code, seconds=round(seconds, 1), images=written, codec=label,
           images_per_s=round(written / seconds, 2) if written else None, note="includes codec load and process start")
    failed += code != 0
    if code != 0 or not written:
        return 1
    epoch_tokens = sum(sum(s["lengths"]) for s in index["shards"])
    config = fit_config(work, shards, sizes, args.device, args.tiny, epoch_tokens)
    code, seconds, _ = run(["fit", "--config", str(config)], work, sizes["fit_timeout"], work / "fit.log")
    logged = last_logged(work / "logs" / "fit" / "metrics.csv", ("perf/tokens_per_s", "perf/mfu", "perf/step_time_s",
                                                                   "perf/packing_efficiency", "loss/train"))
    row = {"rc": code, "seconds": round(seconds, 1), "steps": sizes["steps"], **logged}
    if args.raw_tokens_per_s and "perf/tokens_per_s" in logged:
        row["fit_vs_raw"] = round(logged["perf/tokens_per_s"] / args.raw_tokens_per_s, 3)  # target >= 0.9
    record(out, "e2e-fit", config=str(CONFIG.relative_to(REPO)), **row)
    failed += code != 0
    ckpt = work / "checkpoints" / "last.ckpt"
    if code != 0 or not ckpt.is_file():
        return 1
    code, seconds, text = run(["sample", "--ckpt", str(ckpt), "--sizes", sizes["size"], "--num-samples",
                               str(sizes["samples"]), "--method", "euler", "--steps", str(sizes["sample_steps"]),
                               "--cfg", "1.5", "--interval", "0,0.7", "--out", str(work / "samples"), "--device",
                               args.device, "--no-progress"], work, sizes["sample_timeout"], work / "sample.log")
    rate = re.search(r"made (\d+) images in ([\d.]+) s = ([\d.]+) images/s", text)
    record(out, "e2e-sample", rc=code, seconds=round(seconds, 1), size=sizes["size"], images=sizes["samples"],
           images_per_s=float(rate.group(3)) if rate else None, note="default --tokens-per-pack; includes decode")
    failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
