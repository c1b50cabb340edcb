"""The SLURM scenarios: a real two-node cluster on this host (slurm_cluster.py), the project's sbatch scripts unchanged.

They run under `make test-slurm` (NIT_SLURM_TESTS=1, root: it installs Debian's SLURM if absent and starts daemons)
and are skipped everywhere else, `make test` included. The cluster is started once per session and stopped at the
end, also when a test fails or the session is interrupted. A failing scenario prints, for every job it submitted,
`scontrol show job` and the tail of the job's logs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_jobs  # noqa: E402
from slurm_cluster import DEFAULT_RUN_DIR, Cluster  # noqa: E402

HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("NIT_SLURM_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="SLURM scenarios run under `make test-slurm` (NIT_SLURM_TESTS=1, root)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # setup too: a job a shared fixture submitted (the reference run, the array sweep) that times out fails the setup
    if report.when in ("setup", "call") and report.failed and slurm_jobs.SUBMITTED:
        report.sections.append(("SLURM jobs of this test", "\n".join(j.diagnostics() for j in slurm_jobs.SUBMITTED)))
    if report.when == "teardown":  # the next test's report names its own jobs (and the fixtures' it starts)
        slurm_jobs.SUBMITTED.clear()


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("make test-slurm needs root: it installs SLURM if absent and starts munged, slurmctld, 2 slurmd")
    cluster = Cluster(DEFAULT_RUN_DIR)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Data:
    root: Path
    native: Path  # the training shards (SOURCES of train_xl)
    layout: Path  # DATA_DIR with native/, fixed256/, fixed512/ (the ablation's variants)
    images: Path
    num_images: int


@pytest.fixture(scope="session")
def work(cluster) -> Path:
    """Everything the scenarios write: data, checkpoints, logs (beside the cluster's own files)."""
    root = cluster.root / "work"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def job_env(cluster) -> dict[str, str]:
    """The submitting environment: the cluster, one thread per task (bitwise comparisons, see tests/test_resume.py),
    the probes importable, no NIT_* settings of the caller."""
    env = {k: v for k, v in cluster.env().items() if not k.startswith("NIT_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=f"{slurm_jobs.REPO}:{HERE}")
    return env


@pytest.fixture(scope="session")
def data(work) -> Data:
    """192 synthetic images prepared as in experiments/debug.yaml (pixel:8): 27 packs of 512 tokens an epoch, 13 steps
    on 2 ranks. Fixed-32/-64 sets of them stand in for the ablation's fixed256/fixed512 folders."""
    root = work / "data"
    python = [sys.executable, "-m", "nit_lightning"]
    images = root / "images"
    subprocess.run([*python, "synth", "--out", str(images), "--num-images", "192", "--num-classes", "10",
                    "--max-side", "128"], check=True, capture_output=True)
    layout = root / "imagenet"
    for name, mode in (("native", "native"), ("fixed256", "fixed-32"), ("fixed512", "fixed-64")):
        subprocess.run([*python, "prepare", "--input", str(images), "--output", str(layout / name), "--codec",
                        "pixel:8", "--samples-per-shard", "32", "--mode", mode], check=True, capture_output=True)
    return Data(root, layout / "native", layout, images, 192)


@pytest.fixture(scope="session")
def reference(work, data, job_env) -> Path:
    """The uninterrupted 2-node run every interrupted one is compared with. Its logs go where the script puts them
    by default; they are moved into the run folder, their first place kept in `job_logs.txt`."""
    job, run = slurm_jobs.train("reference", work, data, job_env, default_logs=True)
    state = job.wait_ended()
    run.mkdir(exist_ok=True)
    (run / "job_logs.txt").write_text("\n".join(str(p) for p in job.logs))
    for path in job.logs:
        if path.exists():
            path.rename(run / path.name)
    job.logs = [run / p.name for p in job.logs]
    assert state == "COMPLETED", job.diagnostics()
    return run
