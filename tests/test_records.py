"""The contracts between stages (nit_lightning/records): one atomic writer, one settings check, one checkpoint record,
one folder lock; the real training module's checkpoint read by the real pipeline after its run folder moved."""
from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nit_lightning.records import CheckpointMeta, FolderBusy, SettingsMismatch, SettingsRecord, folder_lock
from nit_lightning.records.checkpoint import EMA_KEY, META_KEY, anchor_paths, locate_paths
from nit_lightning.records.files import atomic_path, commit, read_json, temporary_path, write_json
from nit_lightning.records.lock import LOCK_NAME, acquire, release

PACKAGE = Path(__file__).resolve().parents[1] / "nit_lightning"


# ---- files ---------------------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_temporary_names_are_per_process_unless_shared(tmp_path):
    a, b = temporary_path(tmp_path / "x.npz"), temporary_path(tmp_path / "x.npz")
    assert a != b and str(os.getpid()) in a.name and a.parent == tmp_path
    assert temporary_path(tmp_path / "last.ckpt", shared=True).name == "last.ckpt.tmp"  # every rank of a sharded save


def test_commit_replaces_a_folder_with_a_folder(tmp_path):
    old, new = tmp_path / "last.ckpt", tmp_path / "new"
    (old / "a").mkdir(parents=True)
    (new / "b").mkdir(parents=True)
    commit(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and not new.exists() and not (tmp_path / "last.ckpt.old").exists()


def test_a_damaged_json_file_is_named_in_one_error(tmp_path):
    path = write_json(tmp_path / "result.json", {"fid": 1.0})
    path.write_text(path.read_text()[:5])  # truncated
    with pytest.raises(ValueError, match=r"sweep result '.*result.json' is damaged"):
        read_json(path, "sweep result")


# ---- settings records -------------------------------------------------------------------------------------------
def test_a_settings_record_is_written_then_resumes_then_refuses_naming_each_key(tmp_path):
    path = tmp_path / "out" / "provenance.json"
    record = SettingsRecord("sample-set", {"seed": 0, "size": "8x8", "weights": "abc"}, info={"source": "a.ckpt"})
    assert record.check(path, what="samples", remedy="use another --out") is False  # new: written
    moved = SettingsRecord("sample-set", {"seed": 0, "size": "8x8", "weights": "abc"}, info={"source": "b.ckpt"})
    assert moved.check(path, what="samples", remedy="use another --out") is True  # info is not compared
    other = SettingsRecord("sample-set", {"seed": 1, "size": "8x8", "weights": "xyz"})
    with pytest.raises(SettingsMismatch, match=r"holds samples made with other settings \(seed 0 -> 1, weights 'abc' "
                                               r"-> 'xyz'\); use another --out"):
        other.check(path, what="samples", remedy="use another --out")


def test_records_of_other_stages_and_from_before_records(tmp_path):
    path = SettingsRecord("synth", {"seed": 0}).write(tmp_path / "synth.json")
    with pytest.raises(SettingsMismatch, match="records a 'synth', not a 'prepare'"):
        SettingsRecord.read(path, "prepare")
    legacy = tmp_path / "provenance.json"  # before records: a flat dict of settings
    legacy.write_text(json.dumps({"seed": 0, "source": "x"}))
    assert SettingsRecord("sample-set", {"seed": 0}).check(legacy, what="samples", remedy="-", ignore={"source"})


# ---- checkpoint metadata -------------------------------------------------------------------------------------------
def _net_config() -> dict:
    from dataclasses import asdict

    from nit_lightning.models import build_nit

    return asdict(build_nit("NiT-debug", in_channels=12, num_classes=3).config)


def test_checkpoint_meta_round_trip_and_its_format(tmp_path):
    checkpoint = {EMA_KEY: {"w": torch.zeros(1)}, "global_step": 5}
    CheckpointMeta(_net_config(), codec={"kind": "pixel", "factor": 2, "latent_channels": 12}, step=5,
                   data={"seed": 0}).store(checkpoint)
    stored = checkpoint[META_KEY]
    assert stored["version"] == 2 and stored["has_ema"] is True and stored["conditioning"] == "class"
    meta = CheckpointMeta.from_checkpoint(checkpoint)
    assert meta.step == 5 and meta.data == {"seed": 0} and meta.latent_channels == 12


def test_a_checkpoint_of_the_format_before_records_still_reads():
    old = {"nit_meta": {"net_config": _net_config(), "codec": None, "patch_size": 1, "latent_channels": 12},
           "nit_inputs": {"data": {"seed": 3}}, "nit_skipped_steps": 2, "global_step": 9, EMA_KEY: {}}
    meta = CheckpointMeta.from_checkpoint(old)
    assert (meta.data, meta.skipped_steps, meta.step, meta.has_ema) == ({"seed": 3}, 2, 9, True)


@pytest.mark.parametrize("change, message", [
    ({"version": 3}, "format 3; this code reads up to 2"),
    ({"colour": "red"}, r"keys this code does not know: \['colour'\]"),
])  # fmt: skip
def test_checkpoints_of_another_version_are_refused_in_one_line(change, message):
    checkpoint = {"global_step": 1}
    CheckpointMeta(_net_config()).store(checkpoint)
    checkpoint[META_KEY].update(change)
    with pytest.raises(ValueError, match=message):
        CheckpointMeta.from_checkpoint(checkpoint, "x.ckpt")


def test_codec_paths_are_found_after_the_run_folder_moves(tmp_path, monkeypatch):
    run = tmp_path / "a" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "codec.pt").write_bytes(b"x")
    monkeypatch.chdir(run)
    anchored = anchor_paths({"kind": "tinyae", "path": "codec.pt"}, run / "checkpoints")  # typed relative to the cwd
    assert anchored["path"] == str(run / "codec.pt") and anchored["path_from_checkpoint"] == "../codec.pt"
    shutil.move(tmp_path / "a", tmp_path / "b")
    located = locate_paths(anchored, tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")
    assert located == {"kind": "tinyae", "path": str(tmp_path / "b" / "run" / "codec.pt")}
    assert anchor_paths({"kind": "dcae", "path": "mit-han-lab/dc-ae"}, run)["path"] == "mit-han-lab/dc-ae"  # a hub id


def test_no_checkpoint_metadata_is_spelled_out_outside_the_records_module():
    """nit_meta / ema_state_dict are built and read in records/checkpoint.py only (the tests' helper included)."""
    keys = {"nit_meta", "ema_state_dict", "nit_inputs", "nit_skipped_steps", "net_config"}
    found = []
    files = [p for p in PACKAGE.rglob("*.py") if "records" not in p.parts]
    files += list((Path(__file__).parent / "helpers").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            literal_keys = node.keys if isinstance(node, ast.Dict) else [node.slice] if isinstance(node, ast.Subscript) \
                else []
            for key in literal_keys:
                if isinstance(key, ast.Constant) and key.value in keys:
                    found.append(f"{path.name}:{node.lineno} {key.value!r}")
    assert not found, "checkpoint metadata outside nit_lightning/records: " + ", ".join(found)


# ---- folder locks ---------------------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from nit_lightning.records.lock import acquire
    acquire(sys.argv[1], "prepare")
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_run_into_a_held_folder_stops_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"is in use by prepare \(pid {holder.pid} on .*wait for it to finish"):
            acquire(tmp_path, "sample")
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path, "sample"):  # the holder is dead: its lock is stale and taken over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_only_while_it_is_the_one_judged_stale(tmp_path):
    """Two runs find the same dead holder's lock. The first removes it and takes the folder; the second, judging late,
    must not remove the first run's new lock (a rename-aside without a check did, and both ran into one folder)."""
    from nit_lightning.records.lock import remove_stale_lock

    path = tmp_path / LOCK_NAME
    dead = json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "what": "prepare"}).encode()
    path.write_bytes(dead)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the first run took the stale lock over
        assert json.loads(path.read_text())["pid"] == holder.pid
        assert not remove_stale_lock(path, dead)  # the late run's judgement no longer matches the file
        assert json.loads(path.read_text())["pid"] == holder.pid
        with pytest.raises(FolderBusy, match=rf"pid {holder.pid}"):  # and so it stops, as it should
            acquire(tmp_path, "sample")
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_lock(path, path.read_bytes()) and not path.exists()  # the judged lock itself is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and the takeover lock leaves no file behind


def test_a_self_removing_lock_serialises_holders_and_leaves_no_file(tmp_path):
    """Three processes take the same self-removing lock in turn (each deletes the file as it lets go): none may be inside
    at the same time as another, which a waiter that locked a deleted file would be."""
    script = textwrap.dedent("""
        import os, sys, time
        from nit_lightning.records.lock import waiting_lock
        for _ in range(20):
            with waiting_lock(sys.argv[1], remove_after=True):
                fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # fails if another is inside
                time.sleep(0.002)
                os.close(fd)
                os.unlink(sys.argv[2])
    """)
    lock, inside = tmp_path / "t.lock", tmp_path / "inside"
    runs = [subprocess.Popen([sys.executable, "-c", script, str(lock), str(inside)], stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    errors = [run.communicate(timeout=60)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], errors
    assert list(tmp_path.iterdir()) == []


def test_a_lock_is_released_only_by_its_holder(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "what": "fit"}))
    release(tmp_path)
    assert (tmp_path / LOCK_NAME).exists()
    with pytest.raises(FolderBusy, match="on another host; if that run is gone, delete"):
        acquire(tmp_path, "fit")


# ---- the real writer and the real reader ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_of_the_real_module_samples_the_same_images_after_its_run_folder_moved(tmp_path, monkeypatch):
    """fit (NiTModule, tinyae codec inside the run folder, typed relative) -> move the whole folder -> sample from
    another working directory: the codec is found relative to the checkpoint, and the images are bitwise the same."""
    from helpers.fit import fit_args
    from helpers.shards import write_latent_shards
    from nit_lightning.cli.lightning import main as lightning_main
    from nit_lightning.data.codecs import TinyAECodec
    from nit_lightning.data.tinyae import TinyAE, TinyAEConfig, save_tinyae
    from nit_lightning.generation.sample_set import SampleRun, run_sample
    from nit_lightning.generation.settings import SamplerSettings, SizeSetting

    run = tmp_path / "a" / "run"
    run.mkdir(parents=True)
    monkeypatch.chdir(run)
    torch.manual_seed(0)
    save_tinyae(TinyAE(TinyAEConfig(latent_channels=4, factor=2, width=8, blocks=0)), "codec.pt", scaling_factor=1.0,
                report={})
    shards = write_latent_shards(Path("shards"), channels=4,
                                 settings={"codec": TinyAECodec("codec.pt").describe(), "latent_channels": 4})
    assert lightning_main(fit_args(shards, max_steps=2)) == 0
    ckpt = Path("outputs/debug/checkpoints/last.ckpt")
    meta = CheckpointMeta.from_checkpoint(torch.load(ckpt, weights_only=True), ckpt)
    assert meta.has_ema and meta.step == 2 and meta.codec["path"] == str(run / "codec.pt")
    assert meta.data["sources"] == [{"path": str(run / "shards"), "weight": 1.0}]

    settings = [SizeSetting((8, 12), SamplerSettings(steps=2, cfg_scale=2.0))]
    before = run_sample(SampleRun(ckpt=str(ckpt), out=str(tmp_path / "before"), settings=settings, num_samples=3,
                                  device="cpu", progress=False))["8x12"]
    shutil.move(tmp_path / "a", tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moved = tmp_path / "moved" / "run" / ckpt
    after = run_sample(SampleRun(ckpt=str(moved), out="after", settings=settings, num_samples=3, device="cpu",
                                 progress=False))["8x12"]
    np.testing.assert_array_equal(np.load(before)["arr_0"], np.load(after)["arr_0"])
    assert np.load(after)["arr_0"].std() > 0
