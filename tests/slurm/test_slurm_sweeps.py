"""slurm/sample_eval.sbatch on the two-node cluster: MODE=array (one setting per array task, all finishing at about
the same time) and MODE=sharded (every setting over two tasks on two nodes) give one complete table, the same
metrics both ways. The checkpoint is the reference training run's; features are a small random demo feature net."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slurm_jobs import array_logs, sbatch

SIZES = ["16x16", "16x32", "32x16"]
NUM = 6
CPU = ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--time=15")


@pytest.fixture(scope="session")
def sweep_inputs(work, reference) -> dict[str, str]:
    from nit_lightning.evaluation.arrays import nhwc_to_tensor
    from nit_lightning.evaluation.extractors import load_feature_extractor
    from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, save_featurenet
    from nit_lightning.evaluation.reference import Reference, save_reference

    root = work / "sweep-inputs"
    (root / "refs").mkdir(parents=True)
    torch.manual_seed(0)
    save_featurenet(FeatureNet(FeatureNetConfig(num_classes=3, size=16, widths=[8, 16, 32, 64])), root / "fnet.pt",
                    classes=["a", "b", "c"], report={})
    spec = f"featurenet:{root / 'fnet.pt'}"
    extractor = load_feature_extractor(spec)
    for size in SIZES:
        h, w = (int(v) for v in size.split("x"))
        images = np.random.default_rng(h * w).integers(0, 256, size=(24, h, w, 3), dtype=np.uint8)
        f = extractor(nhwc_to_tensor(images))
        pool, spatial = f["pool"].double().numpy(), f["spatial"].double().numpy()
        save_reference(root / "refs" / f"{size}.npz",
                       Reference(mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
                                 sigma_s=np.cov(spatial, rowvar=False), images=images,
                                 meta={"extractor": extractor.name, "size": [h, w]}))
    settings = [{"size": s, "method": "euler", "steps": 2, "cfg_scale": 1.5, "cfg_interval": [0.0, 0.7]}
                for s in SIZES]
    (root / "sweep.yaml").write_text(yaml.safe_dump({"name": "slurm-test", "settings": settings}))
    return {"SWEEP": str(root / "sweep.yaml"), "CKPT": str(reference / "ckpt" / "last.ckpt"),
            "REF_DIR": str(root / "refs"), "NUM": str(NUM), "EXTRA_ARGS": f"--features {spec}"}


def results(out: Path) -> dict:
    summary = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert sorted(summary["results"]) == sorted(SIZES), f"results.json lists {sorted(summary['results'])}"
    for size in SIZES:
        assert summary["results"][size]["status"] == "ok", summary["results"][size]
        assert sum(line.startswith(f"| {size} |") for line in table.splitlines()) == 1, table
    return {size: summary["results"][size]["metrics"] for size in SIZES}


@pytest.fixture(scope="session")
def array_metrics(work, sweep_inputs, job_env) -> dict:
    out = work / "sweep-array"
    job = sbatch("sample_eval.sbatch", f"--array=0-{len(SIZES) - 1}", *CPU, env=job_env,
                 variables={**sweep_inputs, "MODE": "array", "OUT": str(out)}, log_dir=out / "slurm")
    job.wait_until(lambda: len(job.info()) == len(SIZES) and all(r["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
                                                                 for r in job.info()), 400, "the array tasks")
    array_logs(job)
    assert {r["JobState"] for r in job.info()} == {"COMPLETED"}, job.diagnostics()
    return results(out)


def test_array_tasks_merge_into_one_table(array_metrics):
    for metrics in array_metrics.values():
        assert metrics["num_samples"] == NUM and np.isfinite(metrics["fid"])


def test_sharded_mode_finishes_with_the_array_modes_metrics(work, sweep_inputs, job_env, request):
    out = work / "sweep-sharded"
    options = [o for o in CPU if not o.startswith("--nodes")]
    job = sbatch("sample_eval.sbatch", "--array=0", "--nodes=2", *options, env=job_env,
                 variables={**sweep_inputs, "MODE": "sharded", "OUT": str(out)}, log_dir=out / "slurm")
    try:
        job.wait_until(lambda: len(job.info()) == 1 and job.state in ("COMPLETED", "FAILED", "CANCELLED"), 300,
                       "the sharded sweep")
    finally:
        array_logs(job)
        if job.state in ("PENDING", "RUNNING"):
            job.cancel()  # a deadlocked job must not hold the nodes for the rest of the session
    assert job.state == "COMPLETED"
    assert "over 2 tasks" in job.log_text()
    sharded = results(out)
    array_metrics = request.getfixturevalue("array_metrics")  # after the sharded job: it must finish on its own
    for size in SIZES:
        for key in ("fid", "sfid", "is", "precision", "recall", "num_samples"):
            assert sharded[size][key] == pytest.approx(array_metrics[size][key], rel=1e-6, abs=1e-9), (size, key)
