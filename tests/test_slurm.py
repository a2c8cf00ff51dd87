"""The smoke preset through profiles/slurm on a real one-node SLURM cluster started here (slow).

Needs root and Debian's slurm-wlm and munge (installed with apt-get when missing). The cluster is
this machine: slurm.conf with its CPUs and memory, proctrack/linuxproc, no accounting (so the
profile's status command is squeue, as profiles/README.md says for such clusters). The config goes
to /etc/slurm/slurm.conf because the plugin's job step strips SLURM_CONF from the environment of
its inner srun; an existing slurm.conf that this test did not write makes it skip. The daemons are
stopped by their PIDs and the file removed at the end.

One local run and one SLURM run of the smoke preset with longer training; the SLURM run's training
of seed 1 is scancelled mid-run. Its retry must resume from the checkpoint written on SIGTERM, and
every seed must end byte-identical (EMA weights, artifact) with BPB equal to the local run's.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import stage_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by pgolf tests/test_slurm.py"
TRAIN = {"iterations": 300, "warmdown_steps": 60, "checkpoint_every": 50, "log_every": 10}


# The daemons live in sbin, which a CI shell's PATH may leave out.
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which(cmd[0], path=SEARCH) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                          **kw)


def install() -> None:
    if all(shutil.which(b, path=SEARCH) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if not shutil.which("apt-get", path=SEARCH):
        pytest.skip("slurm-wlm and munge are missing and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = sh("apt-get", "install", "-y", "-q", "slurm-wlm", "munge", env=env)
    if proc.returncode:  # a fresh machine may need the package lists first
        sh("apt-get", "update", "-q", env=env)
        proc = sh("apt-get", "install", "-y", "-q", "slurm-wlm", "munge", env=env)
    if proc.returncode:
        pytest.skip(f"apt-get could not install slurm-wlm and munge: {proc.stderr.strip()[-500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """This machine as slurmd sees it (CPUs, sockets, cores, memory), less 10% memory for the OS."""
    line = sh("slurmd", "-C").stdout.splitlines()[0]
    mem = int(re.search(r"RealMemory=(\d+)", line)[1])
    line = re.sub(r"RealMemory=\d+", f"RealMemory={mem * 9 // 10}", line)
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"  # whatever the host name resolves to


def write_conf(d: Path, host: str) -> None:
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(f"""{MARK}
ClusterName=pgolftest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{node_line()}
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")


def stop(pidfile: Path) -> None:
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root on Linux")
    if CONF.exists() and MARK not in CONF.read_text():
        pytest.skip(f"{CONF} exists and was not written by this test: not touching a real cluster's config")
    install()
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    write_conf(d, host)
    try:
        # A machine that cannot run the daemons (no privileges for them, a sandbox) skips, saying why;
        # once the cluster is up, anything the pipeline does wrong fails.
        munged = sh("munged", "--force", f"--socket={d}/munge.sock", f"--key-file={key}", f"--pid-file={d}/munged.pid",
                    f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed")
        if munged.returncode:
            pytest.skip(f"munged does not start here: {munged.stderr.strip()[-500:]}")
        for daemon in ("slurmctld", "slurmd"):
            proc = sh(daemon)
            if proc.returncode:
                pytest.skip(f"{daemon} does not start here: {proc.stderr.strip()[-500:]}")
        for _ in range(60):
            if "idle" in sh("sinfo", "-h", "-o", "%t").stdout:
                break
            time.sleep(1)
        else:
            logs = "".join((d / f).read_text()[-1000:] for f in ("slurmctld.log", "slurmd.log") if (d / f).exists())
            pytest.skip(f"the one-node cluster never became idle here:\n{logs}")
        yield d
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            stop(d / f"{name}.pid")
        CONF.unlink(missing_ok=True)


def workdir(root: Path) -> Path:
    root.mkdir()
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["data"]["paths"] = [str(REPO / p) for p in cfg["data"]["paths"]]
    cfg["extends"] = str((REPO / "configs" / cfg["extends"]).resolve())
    cfg["train"].update(TRAIN)  # long enough to cancel mid-run
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


def snakemake(root: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(root),
           "--configfile", str(root / "run.yaml"), *args]
    return subprocess.Popen(cmd, stdout=open(root / "snakemake.log", "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=root, **kw)


def site_profile(root: Path) -> Path:
    """The site's settings for this machine, layered after profiles/slurm as a user would."""
    cpus = int(re.search(r"CPUs=(\d+)", node_line())[1])
    site = {"slurm_partition": "cpu", "slurm_account": "none", "gpu_partition": "cpu", "gpus_per_node": 1,
            "cpus_per_task": cpus, "mem_mb": 4000, "mem_mb_per_gpu": 4000, "runtime": 30}
    (root / "site").mkdir()
    (root / "site" / "profile.yaml").write_text(yaml.safe_dump({
        "default-resources": site, "slurm-status-command": "squeue", "slurm-no-account": True}))
    return root / "site"


def training_job(root: Path, seed: int) -> tuple[str, Path] | None:
    """The SLURM job id and the job folder (--out-dir) of the running trainer of `seed` in `root`, from
    its process's command line and environment."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"train" in cmd and b"--seed" in cmd and cmd[cmd.index(b"--seed") + 1] == str(seed).encode() \
                    and Path(os.readlink(proc / "cwd")).resolve() == root.resolve():
                env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
                if b"SLURM_JOB_ID" in env:
                    return env[b"SLURM_JOB_ID"].decode(), root / cmd[cmd.index(b"--out-dir") + 1].decode()
        except (OSError, ValueError, IndexError):
            continue  # a process that ended or is not ours
    return None


def cancel_training_midway(root: Path, seed: int, after_step: int, timeout: float = 300) -> Path:
    """scancel the SLURM job that trains `seed` once its log passed `after_step`; its job folder."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = training_job(root, seed)
        log = found[1] / "train.log" if found else None
        steps = [int(m) for m in re.findall(r"^step (\d+)/", log.read_text(), re.M)] if log and log.exists() else []
        if steps and steps[-1] >= after_step:
            assert sh("scancel", found[0]).returncode == 0
            return found[1]
        time.sleep(0.2)
    pytest.fail(f"training of seed {seed} never reached step {after_step} in a running SLURM job")


def test_smoke_through_slurm_equals_a_local_run_and_resumes_after_scancel(cluster, tmp_path):
    local = workdir(tmp_path / "local")
    t0 = time.time()
    assert snakemake(local, "--cores", "all").wait() == 0, (local / "snakemake.log").read_text()[-4000:]
    local_s = time.time() - t0

    remote = workdir(tmp_path / "slurm")
    t0 = time.time()
    run = snakemake(remote, "--profile", str(REPO / "profiles" / "slurm"), "--profile", str(site_profile(remote)))
    job_dir = cancel_training_midway(remote, seed=1, after_step=100)
    assert run.wait(timeout=900) == 0, (remote / "snakemake.log").read_text()[-4000:]
    slurm_s = time.time() - t0
    print(f"smoke preset ({TRAIN['iterations']} steps): local {local_s:.0f} s, SLURM {slurm_s:.0f} s")

    # Snakemake deletes a job's log before its retry; the trainer's own log in ckpt/ keeps both attempts
    log = (job_dir / "ckpt" / "train.log").read_text()
    stopped = int(re.search(r"SIGTERM: checkpoint written at step (\d+)", log)[1])
    resumed = int(re.search(r"resumed from .* at step (\d+)", log)[1])
    assert 100 <= stopped < TRAIN["iterations"] and resumed == stopped, log[-3000:]
    assert f"resumed from {job_dir.relative_to(remote)}/ckpt at step {stopped}" in (job_dir / "train.log").read_text()
    for seed in (1, 2):
        # the same job folders (their keys name the same config and code) in both working directories
        a, b = (lambda stage, name, r=r, s=seed: stage_file(r, "smoke", s, stage, name) for r in (local, remote))
        assert a("train", "ema.pgt").read_bytes() == b("train", "ema.pgt").read_bytes(), seed
        assert a("compress", "artifact.pgz").read_bytes() == b("compress", "artifact.pgz").read_bytes(), seed
        ev_a, ev_b = (json.loads(f("evaluate", "eval.json").read_text()) for f in (a, b))
        bpb = [k for k in ev_a if k.endswith("bpb") and isinstance(ev_a[k], float)]
        assert bpb and all(ev_a[k] == ev_b[k] for k in bpb), (ev_a, ev_b)
