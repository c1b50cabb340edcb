"""`python -m nit_lightning <command> ...`: Lightning's fit/validate/test/predict plus the suite's own commands."""
from __future__ import annotations

import importlib
import sys

# Commands of the suite other than Lightning's: nit_lightning/cli/<name>.py (the demo: nit_lightning/demo/command.py,
# a layer above the commands), each with `main(argv) -> int`.
# Imported lazily so that `--help` of one command never pays for another's imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("nit_lightning.cli.synth", "write a procedural native-resolution image folder"),
    "prepare": ("nit_lightning.cli.prepare", "encode an image folder into latent WebDataset shards"),
    "sample": ("nit_lightning.cli.sample", "generate images from a checkpoint (PNG + ADM npz)"),
    "reference": ("nit_lightning.cli.reference", "build or inspect ADM-format reference statistics"),
    "evaluate": ("nit_lightning.cli.evaluate", "FID / sFID / IS / precision / recall (+ CLIP score) of a sample set"),
    "coco-prompts": ("nit_lightning.cli.coco_prompts", "COCO-2014 zero-shot prompts (+ the chosen real images)"),
    "sweep": ("nit_lightning.cli.sweep", "sample + evaluate a resolution or aspect-ratio sweep"),
    "featurenet": ("nit_lightning.cli.featurenet", "train the small demo feature network (Inception stand-in)"),
    "tinyae": ("nit_lightning.cli.tinyae", "train the tiny autoencoder of the tinyae:PATH codec"),
    "tinytext": ("nit_lightning.cli.tinytext", "make the tiny text encoder of tinytext:PATH from captions (NiT-T2I)"),
    "demo": ("nit_lightning.demo.command", "the CPU end-to-end demo: synth, prepare, fit, sample, evaluate"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = ["usage: python -m nit_lightning <command> [options]", "", "Lightning commands (LightningCLI):"]
    lines += [f"  {name:<12} {name} with --config experiments/<name>.yaml" for name in LIGHTNING_COMMANDS]
    lines += ["", "Suite commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `python -m nit_lightning <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[0]
    if command in COMMANDS:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(argv[1:]) or 0)
    if command in LIGHTNING_COMMANDS or command.startswith("-"):
        # before torch and Lightning are imported (seconds): from here on SIGUSR1/SIGTERM/SIGINT never find their
        # default action, which would kill a job with nothing saved (stop_signals.py says what each one does when)
        from nit_lightning import stop_signals

        stop_signals.install(process_wide=True)
        from nit_lightning.cli.lightning import main as lightning_main

        return int(lightning_main(argv) or 0)
    print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
