"""The CPU demo of NiT-T2I (`make demo-t2i`, experiments/demo_t2i.yaml): does a text-to-image NiT follow its prompts,
also for colour × shape pairs it never saw together, and at sizes it never trained on?

Steps, each reused when its outputs exist (a rerun resumes): captioned synthetic images with held-out pairs ->
tinyae codec -> latent shards carrying the captions (`prepare --captions`) -> tinytext encoder -> the grayscale shape
classifier -> `fit` (NiTModule with the text encoder) -> `sample --prompts` for every (seen / held-out pair) × (seen /
unseen size) group -> shape, colour and both-correct rates with standard errors (demo/t2i_metrics.py) -> a prompts ×
sizes grid -> OUT/report.md. Every value lives in the config; this file fills in `${out}`, `${run}`, `${seed}`,
`${sources}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nit_lightning.data.sizes import format_size, parse_size
from nit_lightning.demo import report
from nit_lightning.demo.config import fill
from nit_lightning.demo.steps import Demo
from nit_lightning.records import folder_lock, read_json, write_json, write_text

RUN = "t2i"
GRID_PROMPTS = 4  # prompts of each pair kind in the report's grid


class T2IDemo(Demo):
    """The T2I demo's folders and steps (the fit, codec and settings steps are the class-conditional demo's)."""

    def __init__(self, config: dict[str, Any], out: str | Path) -> None:
        self.out = Path(out)
        self.config = fill(config, out=str(self.out))
        self.ablation = False
        self.images, self.shards, self.eval = self.out / "data" / "images", self.out / "data" / "shards", self.out / "eval"
        sample = self.config["sample"]
        self.size_kinds = {"seen": [parse_size(s) for s in sample["seen_sizes"]],
                           "unseen": [parse_size(s) for s in sample["unseen_sizes"]]}
        self.sizes = self.size_kinds["seen"] + self.size_kinds["unseen"]
        self.timer = report.StepTimer(self.out / "timings.json")

    def runs(self) -> dict[str, tuple[list[str], int]]:
        return {RUN: (["native"], int(self.config["seed"]))}

    # -- data, encoder, classifier -----------------------------------------------------------------------------------
    def make_images(self) -> None:
        from nit_lightning.data.synthetic_captions import CaptionedSynthSettings, write_captioned_synthetic

        with self.timer.step("1-images", "synthetic captioned images, held-out colour x shape pairs") as info:
            if (self.images / "synth.json").is_file():
                info["status"] = "reused"  # write_captioned_synthetic refuses a folder made with other settings
                return
            manifest = write_captioned_synthetic(CaptionedSynthSettings(out=str(self.images),
                                                                        seed=int(self.config["seed"]),
                                                                        **self.config["images"]))
            info["counts"] = manifest["counts"]

    def manifest(self) -> dict[str, Any]:
        return read_json(self.images / "synth.json", "captioned set manifest")

    def make_text_encoder(self) -> Path:
        """The tinytext encoder whose vocabulary is every word of the set's captions (held-out pairs use no new word)."""
        from nit_lightning.data.tinytext import TinyTextConfig, make_tiny_text_encoder, save_tiny_text_encoder
        from nit_lightning.demo.t2i_metrics import read_captions

        settings = dict(self.config["text_encoder"])
        path = Path(settings.pop("path"))
        with self.timer.step("2c-text-encoder", "tiny word-level text encoder (frozen, random, seeded)") as info:
            if path.is_file():
                info["status"] = "reused"
                return path
            encoder = make_tiny_text_encoder([line["caption"] for line in read_captions(self.images)],
                                             TinyTextConfig(**settings))
            save_tiny_text_encoder(encoder, path)
            info["vocabulary"] = len(encoder.vocabulary)
        return path

    def make_shape_classifier(self) -> Path:
        from nit_lightning.demo.t2i_metrics import train_shape_classifier

        path = self.eval / "shape.pt"
        with self.timer.step("3-shape", "grayscale shape classifier on the training images (colour cannot help)") as info:
            if path.is_file():
                info["status"] = "reused"
                return path
            trained = train_shape_classifier(self.images, path, seed=int(self.config["seed"]),
                                             **self.config["evaluate"]["shape"])
            info.update({k: trained[k] for k in ("train_acc", "val_acc") if k in trained})
        return path

    # -- prompts, samples, scores ------------------------------------------------------------------------------------
    def prompts(self) -> list[dict[str, Any]]:
        """`per_group` prompts per (pair kind, size kind): the kind's pairs in turn, its sizes in turn, one seed each."""
        from nit_lightning.data.synthetic_captions import caption

        manifest, per_group = self.manifest(), int(self.config["sample"]["per_group"])
        pairs = {"seen": [tuple(p) for p in manifest["seen"]], "held-out": [tuple(p) for p in manifest["held_out"]]}
        out: list[dict[str, Any]] = []
        for pair_kind, pair_list in pairs.items():
            for size_kind, sizes in self.size_kinds.items():
                for j in range(per_group):
                    colour, shape = pair_list[j % len(pair_list)]
                    size = sizes[(j // len(pair_list) + j) % len(sizes)]  # a pair meets every size in turn
                    out.append({"prompt": caption(colour, shape), "height": size[0], "width": size[1],
                                "seed": int(self.config["seed"]) * 1_000_003 + len(out),
                                "colour": colour, "shape": shape, "pair": pair_kind, "size": size_kind})
        return out

    def sample_prompts(self, ckpt: Path, rows: list[dict[str, Any]], folder: Path, step: str,
                       sizes: list[tuple[int, int]] | None = None) -> Path:
        """`sample --prompts` into `folder` (the checkpoint's recipe, `sample.sampler` keys over it)."""
        from nit_lightning.generation.prompt_set import PromptRun, run_prompts
        from nit_lightning.generation.prompts import PromptSpec

        keys = ("prompt", "height", "width", "seed")
        specs = [PromptSpec(r["prompt"], i + 1, (r["height"], r["width"]) if "height" in r else None, r.get("seed"),
                            {k: v for k, v in r.items() if k not in keys}) for i, r in enumerate(rows)]
        settings = self.config["sample"]
        with self.timer.step(step, f"{len(rows)} prompts x {len(sizes) if sizes else 1} sizes") as info:
            if (folder / "done.json").is_file():
                info["status"] = "reused"  # run_prompts would refuse other settings; the record says they match
            run_prompts(PromptRun(ckpt=str(ckpt), out=str(folder), specs=specs, sizes=list(sizes or []),
                                  sampler_flags=dict(settings.get("sampler") or {}), device="cpu",
                                  seed=int(self.config["seed"]), tokens_per_forward=int(settings["tokens_per_forward"])))
        return folder

    def score(self, folder: Path, shape: Path) -> dict[str, Any]:
        """Shape, colour, both-correct per group (with standard errors) of a prompted sample folder -> metrics.json."""
        from nit_lightning.data.imageops import read_rgb
        from nit_lightning.demo.t2i_metrics import score

        path = folder.parent / "metrics.json"
        with self.timer.step("6-score", "shape, colour and both-correct per group") as info:
            rows = _read_rows(folder)
            key = report.stamp(folder / "prompts.jsonl")
            if path.is_file() and read_json(path, "T2I demo metrics").get("key") == key:
                info["status"] = "reused"
                return read_json(path, "T2I demo metrics")
            images = [read_rgb(folder / r["file"]) for r in rows]
            scored = score(images, [r["meta"] for r in rows], shape)
            metrics = {"key": key, "groups": scored["groups"], "num_images": len(rows)}
            write_json(path, metrics)
            info["groups"] = {g: v["both"]["rate"] for g, v in scored["groups"].items()}
        return metrics


def _read_rows(folder: Path) -> list[dict[str, Any]]:
    """The lines of a finished prompted folder's prompts.jsonl, with their meta (the truth of each prompt)."""
    import json

    from nit_lightning.evaluation.sample_prompts import read_sample_prompts

    read_sample_prompts(folder)  # every listed image there, no unlisted one
    return [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines() if line.strip()]


def run_t2i_demo(config: dict[str, Any], out: str | Path, *, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) the T2I demo; returns {"report", "metrics", "goals", "timings"}."""
    import torch

    demo = T2IDemo(config, out)
    torch.set_num_threads(int(threads or demo.config["threads"]))
    with folder_lock(demo.out, "demo"):
        demo.check_settings()
        print(f"nit-lightning T2I demo -> {demo.out.resolve()}", flush=True)
        demo.make_images()
        codec = demo.codec_spec()
        shards = demo.make_shards("native", codec, captions=str(demo.images / "captions.jsonl"))
        demo.make_text_encoder()
        shape = demo.make_shape_classifier()
        ckpt = demo.train(RUN, [shards], int(demo.config["seed"]))
        run = demo.out / "runs" / RUN
        samples = demo.sample_prompts(ckpt, demo.prompts(), run / "samples", "5-sample")
        metrics = demo.score(samples, shape)
        grid = demo.sample_prompts(ckpt, _grid_prompts(demo), run / "grid", "5-grid", sizes=demo.sizes)
        goals = check_goals(metrics, demo.config["evaluate"]["goals"])
        path = write_report(demo, metrics, goals, grid / "grid.png")
        print((demo.out / "report.md").read_text(), flush=True)
        return {"report": path, "metrics": metrics, "goals": goals, "timings": demo.timer.records}


def _grid_prompts(demo: T2IDemo) -> list[dict[str, Any]]:
    """The report's grid: the first GRID_PROMPTS seen and held-out prompts (distinct captions), at every size."""
    from nit_lightning.data.synthetic_captions import caption

    manifest = demo.manifest()
    seen, held = manifest["seen"], manifest["held_out"]  # spread over the lists: other shapes and colours
    chosen = ([(seen[k * len(seen) // GRID_PROMPTS], "seen") for k in range(GRID_PROMPTS)]
              + [(held[k * len(held) // GRID_PROMPTS], "held-out") for k in range(GRID_PROMPTS)])
    return [{"prompt": caption(c, s), "seed": int(demo.config["seed"]) + k, "pair": kind}
            for k, ((c, s), kind) in enumerate(chosen)]


def check_goals(metrics: dict[str, Any], goals: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each goal {"<pair>/<size>": minimum both-correct rate} against the measured rate and its standard error."""
    out = {}
    for group, minimum in goals.items():
        both = metrics["groups"].get(group, {}).get("both")
        if both is None:
            raise ValueError(f"goal for {group!r}, but the demo measured only {sorted(metrics['groups'])}")
        out[group] = {"minimum": float(minimum), "rate": both["rate"], "se": both["se"], "met": both["rate"] >= minimum}
    return out


def write_report(demo: T2IDemo, metrics: dict[str, Any], goals: dict[str, Any], grid: Path) -> Path:
    from nit_lightning.demo.t2i_metrics import format_table

    timings = demo.timer.records
    total = sum(float(r.get("seconds", 0)) for r in timings.values())
    seen = ", ".join(format_size(s) for s in demo.size_kinds["seen"])
    unseen = ", ".join(format_size(s) for s in demo.size_kinds["unseen"])
    lines = [
        "# NiT-T2I CPU demo", "",
        f"Does the model draw what the prompt says? Prompts name a colour and a shape; **held-out** pairs never "
        f"appear together in training. Seen sizes: {seen}; unseen sizes: {unseen}. Rates are over "
        f"{metrics['num_images']} samples, ± one binomial standard error (demo/t2i_metrics.py: colour read back "
        "against the palette, shape by the grayscale classifier).", "",
        format_table(metrics["groups"]), "",
        "| goal (both correct) | minimum | measured | met |", "|---|---|---|---|",
        *[f"| {g} | {v['minimum']:.2f} | {v['rate']:.3f} ± {v['se']:.3f} | {'yes' if v['met'] else '**no**'} |"
          for g, v in goals.items()], "",
        f"![prompts x sizes]({Path('runs') / RUN / 'grid' / 'grid.png'})", "",
        f"Steps (seconds, this machine): " + ", ".join(f"{k} {v.get('seconds')}" for k, v in timings.items())
        + f"; total {total:.0f} s.", "",
    ]
    path = demo.out / "report.md"
    write_text(path, "\n".join(lines))
    return path
