"""A real two-node SLURM cluster on this one host, for tests/slurm: install, configure, start, wait, stop.

Debian's slurmctld/slurmd (22.05, built with multiple-slurmd support) and munge. Two `slurmd -N n1` / `-N n2` on
distinct ports form the cluster; `127.0.0.1 n1 n2` in /etc/hosts lets srun, Lightning's SLURMEnvironment and the
scripts' rendezvous resolve the node names. Everything the cluster writes (config, state, spool, daemon logs, its own
munge socket and key) lives under one run directory; only the /etc/hosts line is outside it (removed on stop if this
module added it). Needs root (package install, daemons that start jobs as any user).

    python tests/slurm/slurm_cluster.py up   [RUN_DIR]   # install if absent, start, wait for both nodes
    python tests/slurm/slurm_cluster.py down [RUN_DIR]   # cancel every job, stop the daemons started by `up`
Then `export SLURM_CONF=RUN_DIR/etc/slurm.conf` to use sbatch, squeue, scontrol against it.
The ports are fixed, so one cluster runs per machine: `up` takes /tmp/nit-slurm.lock (NIT_SLURM_LOCK) for as long as
its process lives, waiting for another session's cluster to be done; `down` from another process leaves a cluster
alone whose owner is still alive (two sessions once stopped each other's daemons).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RUN_DIR = Path(os.environ.get("NIT_SLURM_RUN_DIR", "/tmp/nit-slurm"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")
NODES = {"n1": 17101, "n2": 17102}  # slurmd ports; slurmctld listens on CTLD_PORT
CTLD_PORT = 17817
HOSTS_LINE = "127.0.0.1 n1 n2  # nit-lightning make test-slurm"
KILL_WAIT = 30  # s between SIGTERM and SIGKILL when a job ends (the grace window for the save)
LOCK = Path(os.environ.get("NIT_SLURM_LOCK", "/tmp/nit-slurm.lock"))
_held: dict[str, object] = {}  # the lock's open file while this process owns the cluster


def own_cluster(wait: float) -> bool:
    """Take the machine-wide cluster lock (kept until this process exits); False if another live process holds it
    after `wait` seconds. Says who holds it while waiting."""
    if "file" in _held:
        return True
    handle = open(LOCK, "a+")
    deadline, told = time.time() + wait, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() >= deadline:
                handle.close()
                return False
            if not told:
                handle.seek(0)
                print(f"waiting for the test cluster of another session ({handle.read().strip()})", file=sys.stderr)
                told = True
            time.sleep(5)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held["file"] = handle
    return True


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)


def ensure_packages(attempts: int = 3) -> None:
    """apt-get install the SLURM and munge packages unless their programs are on PATH; retries a failed download."""
    if all(shutil.which(p) for p in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        for attempt in range(1, attempts + 1):
            result = subprocess.run(step, env=env, text=True, capture_output=True)
            if result.returncode == 0:
                break
            print(f"{' '.join(step[:2])} failed (attempt {attempt}/{attempts}): {result.stderr.strip()[-500:]}",
                  file=sys.stderr)
            if attempt == attempts:
                raise RuntimeError(f"`{' '.join(step)}` failed {attempts} times")
            time.sleep(5 * attempt)
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if missing:
        raise RuntimeError(f"installed {PACKAGES} but {missing} are still not on PATH")


def slurm_conf(root: Path) -> str:
    """slurm.conf of the test cluster: two nodes of 2 CPUs on this host, requeue on, no cgroups, no accounting."""
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=4000 "
                      "State=UNKNOWN" for name, port in NODES.items())
    return f"""# written by tests/slurm/slurm_cluster.py
ClusterName=nittest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait={KILL_WAIT}
MinJobAge=3600
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """The daemons of one run directory; `start()` and `stop()` are idempotent, `stop()` also after a failure."""

    def __init__(self, root: Path = DEFAULT_RUN_DIR) -> None:
        self.root = Path(root)
        self.conf = self.root / "etc" / "slurm.conf"
        self.pids_file = self.root / "daemons.json"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for SLURM commands against this cluster: SLURM_CONF set, the caller's own SLURM_* dropped."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 90, wait_for_other: float = 1800) -> None:
        if not own_cluster(wait_for_other):
            raise RuntimeError(f"another session's SLURM test cluster still holds {LOCK} after {wait_for_other:.0f} s")
        ensure_packages()
        self.stop()  # daemons left by an earlier run of this directory (its owner is gone: we hold the lock)
        for sub in ("state", "log", "spool"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for sub in ("etc", "state", "log", "munge", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged checks the socket's directory chain
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.root))
        self._add_hosts_line()
        pids: dict[str, int] = {}
        munge = self.root / "munge"
        self._spawn(pids, "munged", ["munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                                     f"--key-file={key}", f"--log-file={munge}/munged.log",
                                     f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed"])
        self._wait(lambda: (munge / "munge.socket").exists(), 20, "munged socket")
        self._spawn(pids, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: subprocess.run(["scontrol", "ping"], env=self.env(), capture_output=True,
                                          text=True).stdout.count("is UP") > 0, 30, "slurmctld")
        for node in NODES:
            self._spawn(pids, f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, "nodes n1 and n2 idle")

    def _spawn(self, pids: dict[str, int], name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        pids[name] = process.pid
        self.pids_file.write_text(json.dumps(pids))
        time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({process.returncode}): see {self.root}/log/")

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                tails = "\n".join(f"== {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                                  for p in sorted((self.root / "log").glob("*")))
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
            time.sleep(0.3)

    def stop(self) -> bool:
        """Cancel every job, wait for their processes, stop the daemons this directory's `start` spawned, unless another
        live process owns the cluster."""
        if not own_cluster(wait=0):
            print(f"the test cluster belongs to another live session ({LOCK}): left running", file=sys.stderr)
            return False
        if not self.pids_file.exists():
            self._remove_hosts_line()
            return True
        pids = json.loads(self.pids_file.read_text())
        alive = {name: pid for name, pid in pids.items() if _alive(pid)}
        if "slurmctld" in alive:
            env = self.env()
            subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
            deadline = time.time() + KILL_WAIT + 15
            while time.time() < deadline:
                out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            pid = alive.get(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + 15
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids_file.unlink()
        self._remove_hosts_line()
        return True

    def _add_hosts_line(self) -> None:
        try:
            if socket.gethostbyname("n1") == socket.gethostbyname("n2") == "127.0.0.1":
                return
        except OSError:
            pass
        with open("/etc/hosts", "a") as hosts:
            hosts.write("\n" + HOSTS_LINE + "\n")

    def _remove_hosts_line(self) -> None:
        try:
            text = Path("/etc/hosts").read_text()
        except OSError:
            return
        if HOSTS_LINE in text:
            lines = [line for line in text.splitlines() if line.strip() != HOSTS_LINE]
            Path("/etc/hosts").write_text("\n".join(lines).rstrip("\n") + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is not alive: reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("up", "down"):
        sys.exit(__doc__)
    cluster = Cluster(Path(sys.argv[2]) if len(sys.argv) == 3 else DEFAULT_RUN_DIR)
    if sys.argv[1] == "up":
        cluster.start()
        print(f"cluster up: export SLURM_CONF={cluster.conf}")
    elif cluster.stop():
        print("cluster down")
