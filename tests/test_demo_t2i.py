"""The NiT-T2I CPU demo (experiments/demo_t2i*.yaml): config plumbing (fast) and the quick config end to end (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nit_lightning.demo.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FULL, QUICK = EXPERIMENTS / "demo_t2i.yaml", EXPERIMENTS / "demo_t2i_quick.yaml"


def test_t2i_configs_load_and_state_the_goals():
    full, quick = load_config(FULL), load_config(QUICK)
    assert full["kind"] == quick["kind"] == "t2i"
    assert full["evaluate"]["goals"] == {"seen/seen": 0.8, "held-out/seen": 0.6}
    assert quick["fit"]["model"]["text_encoder"] == full["fit"]["model"]["text_encoder"]
    assert set(full["sample"]["seen_sizes"]).isdisjoint(full["sample"]["unseen_sizes"])


def test_a_t2i_config_with_a_class_section_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {FULL}\nruns: {{native: [native]}}\n")
    with pytest.raises(ValueError, match=r"unknown sections \['runs'\]"):
        load_config(bad)


@pytest.mark.slow
def test_quick_t2i_demo_runs_end_to_end_and_reuses_its_steps(tmp_path):
    from nit_lightning.demo.t2i import run_t2i_demo

    out = tmp_path / "demo"
    result = run_t2i_demo(load_config(QUICK), out, threads=2)
    groups = result["metrics"]["groups"]
    assert set(groups) == {"seen/seen", "seen/unseen", "held-out/seen", "held-out/unseen"}
    assert all(g["both"]["n"] == 6 for g in groups.values()) and result["metrics"]["num_images"] == 24
    rows = [json.loads(line) for line in (out / "runs/t2i/samples/prompts.jsonl").read_text().splitlines()]
    assert {r["meta"]["pair"] for r in rows} == {"seen", "held-out"} and all(r["prompt"] for r in rows)
    held = {tuple(p) for p in json.loads((out / "data/images/synth.json").read_text())["held_out"]}
    assert all((r["meta"]["colour"], r["meta"]["shape"]) in held for r in rows if r["meta"]["pair"] == "held-out")
    report = (out / "report.md").read_text()
    assert "| seen/seen | 0.80 |" in report and (out / "runs/t2i/grid/grid.png").is_file()
    again = run_t2i_demo(load_config(QUICK), out, threads=2)  # a rerun reuses every step
    assert again["metrics"]["groups"] == groups
    assert [name for name, record in again["timings"].items() if not record.get("reused_now")] == []
