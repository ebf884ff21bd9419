"""Acceptance: DeepSpeed's default launcher, pdsh over real ssh, trains the tiny config on two hosts.

The two hosts are Linux network namespaces on this machine, joined by a veth pair whose ends (named
``alps0`` in both) carry 10.77.0.1 and 10.77.0.2; those addresses exist nowhere else, so nothing leaves
the pair. Each namespace runs its own sshd (Debian openssh-server) on its address, with a host key and a
client key made here. The ssh client settings (that key, no host-key check) reach every ssh started in a
namespace through ``ip netns exec``'s documented ``/etc/netns/NAME/`` bind mounts, so root's own ssh files
are never touched. ``alps-ds launch --hostfile`` runs in the first namespace: DeepSpeed's runner checks
ssh, pdsh ssh-es into both sshds, and each host's DeepSpeed launcher starts one rank there, inside that
namespace; the ranks meet at 10.77.0.1 and talk gloo across the veth link. The remote shells get
PATH, PYTHONPATH and DS_ACCELERATOR from ``.deepspeed_env`` in the launch directory (DeepSpeed's
documented way to set the environment of every node). Needs root and ``ip``; ``.ci/run`` installs
openssh-server, pdsh and iproute2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from dist import BIN, REPO, rank_env
from test_multinode import check_trained

pytestmark = pytest.mark.slow

ADDRS = ("10.77.0.1", "10.77.0.2")
IFACE = "alps0"
SSHD = "/usr/sbin/sshd"


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Hosts:
    names: tuple[str, str]  # network namespaces, one per host
    logs: tuple[Path, Path]  # each sshd's log


def namespaces_or_skip(names: tuple[str, str]) -> None:
    """Create the two namespaces, or skip the module where this machine cannot (not root, no ip)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("no 'ip' command (Debian: apt-get install iproute2)")
    missing = [
        tool for tool, found in (("openssh-server", Path(SSHD).exists()), ("pdsh", shutil.which("pdsh"))) if not found
    ]
    if missing:  # namespaces work here, so the test must run: say what to install instead of a late traceback
        pytest.fail(f"install {' and '.join(missing)} (apt-get install -y {' '.join(missing)}; .ci/run does)")
    for i, name in enumerate(names):
        proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if proc.returncode != 0:
            for made in names[:i]:
                subprocess.run(["ip", "netns", "del", made], capture_output=True)
            pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()}")


def link(names: tuple[str, str], tag: str) -> None:
    """A veth pair between the namespaces, ``alps0`` with one address in each, plus loopback."""
    ends = (f"{tag}a", f"{tag}b")
    sh("ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
    for name, end, addr in zip(names, ends, ADDRS):
        sh("ip", "link", "set", end, "netns", name)
        sh("ip", "-n", name, "link", "set", end, "name", IFACE)
        sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", IFACE)
        sh("ip", "-n", name, "link", "set", IFACE, "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")


def ssh_files(root: Path, names: tuple[str, str]) -> list[Path]:
    """Keys, one sshd config per host, and the client config each namespace sees as /etc/ssh/ssh_config."""
    for key in ("client_key", "host_key"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key))
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    configs = []
    for name, addr in zip(names, ADDRS):
        conf = root / f"sshd_{name}.conf"
        conf.write_text(
            f"ListenAddress {addr}\nPort 22\nHostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "UsePAM no\nStrictModes no\nPidFile none\n"
        )
        configs.append(conf)
        client = Path("/etc/netns") / name / "ssh" / "ssh_config"
        client.parent.mkdir(parents=True)
        client.write_text(
            "Host 10.77.0.*\n"
            f"  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        )
    return configs


def teardown(names: tuple[str, str], sshds: list[subprocess.Popen], made_run_sshd: bool) -> None:
    """Stop everything started in the namespaces (sshd, its sessions, the ranks), then remove them."""
    for name in names:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
    for proc in sshds:
        proc.wait(timeout=30)
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # removes the veth pair with it
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    for path in (Path("/etc/netns"), Path("/run/sshd") if made_run_sshd else None):
        if path is not None and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two namespace hosts, each with an sshd on its veth address; removed afterwards, also on failure."""
    tag = f"alps{os.getpid() % 100000}"
    names = (f"{tag}-a", f"{tag}-b")
    namespaces_or_skip(names)
    root = tmp_path_factory.mktemp("hosts")
    sshds: list[subprocess.Popen] = []
    made_run_sshd = not Path("/run/sshd").exists()
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        link(names, tag)
        logs = (root / "sshd_a.log", root / "sshd_b.log")
        for name, conf, log in zip(names, ssh_files(root, names), logs):
            with log.open("w") as f:
                sshds.append(
                    subprocess.Popen(["ip", "netns", "exec", name, SSHD, "-D", "-e", "-f", str(conf)], stderr=f)
                )
        for addr in ADDRS:  # wait until each sshd answers on its own address
            sh("ip", "netns", "exec", names[0], "ssh", "-o", "ConnectionAttempts=20", addr, "true")
        yield Hosts(names, logs)
    finally:
        teardown(names, sshds, made_run_sshd)


def test_pdsh_launch_trains_on_two_namespace_hosts(hosts, tmp_path):
    job = tmp_path / "job"  # the launch directory: DeepSpeed reads .deepspeed_env here, remote shells cd here
    job.mkdir()
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": IFACE,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    (job / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (job / "hostfile").write_text("".join(f"{addr} slots=1\n" for addr in ADDRS))
    out = job / "out"
    train = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"output.dir={out}"]
    train += ["--set", f"data.datasets.0.path={REPO / 'configs' / 'data' / 'tiny.jsonl'}"]
    train += ["--set", f"deepspeed={REPO / 'configs' / 'ds_zero2.json'}", "--set", "logging.progress=false"]
    argv = ["ip", "netns", "exec", hosts.names[0], sys.executable, "-m", "alps_ds", "launch", "--hostfile", "hostfile"]
    proc = subprocess.run([*argv, "--", *train], cwd=job, env=rank_env(), capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "--launcher pdsh" in log and f"pdsh -S -f 1024 -w {ADDRS[0]},{ADDRS[1]}" in log
    # each host's DeepSpeed launcher (pdsh prefixes its lines with the host) started its own rank there
    for node, addr in enumerate(ADDRS):
        assert f"{addr}: " in log and f"node_rank={node}" in log
        assert any(line.startswith(f"{addr}: ") and "exits successfully" in line for line in log.splitlines())
    assert f"global_rank_mapping=defaultdict(<class 'list'>, {{'{ADDRS[0]}': [0], '{ADDRS[1]}': [1]}})" in log
    for sshd_log in hosts.logs:  # both logins were real ssh sessions with the test's key
        assert "Accepted publickey for root" in sshd_log.read_text()
    check_trained(out, world=2)
    last = out / "checkpoints" / json.loads((out / "checkpoints" / "latest.json").read_text())["tag"]
    shards = sorted(p.name for p in last.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # one ZeRO shard per rank
