"""alps-ds launch: dry-run argv for every mode, MPI/SLURM rank discovery, and pre-flight failures
that stop a launch before anything starts."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import sys

import pytest
from dist import BIN, REPO, rank_env

from alps_ds.arch import AttentionSpec
from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.launcher.discover import discover, export_env
from alps_ds.launcher.preflight import CheckInputs, run_checks
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.tiny import tiny_config

TRAIN = ["--", "--config", "configs/tiny.yaml", "--set", "output.dir=/tmp/x y"]


def dry(capsys, *argv: str) -> list[list[str]]:
    """Run ``alps-ds launch --dry-run`` and return the printed argv lists, one per node."""
    import shlex

    assert main(["launch", "--dry-run", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines if line and not line.startswith(("#", "NOTE"))]


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hf"
    path.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    return str(path)


def test_deepspeed_fan_out_one_command(capsys, hostfile):
    (cmd,) = dry(capsys, "--hostfile", hostfile, "--launcher", "openmpi", "--master-port", "29999", *TRAIN)
    assert cmd[0] == str(BIN / "deepspeed")
    i = cmd.index("--module")
    assert cmd[i + 1 :] == ["alps_ds", "train", "--config", "configs/tiny.yaml", "--set", "output.dir=/tmp/x y"]
    assert cmd[cmd.index("--hostfile") + 1] == hostfile
    assert cmd[cmd.index("--launcher") + 1] == "openmpi"
    assert cmd[cmd.index("--master_addr") + 1] == "node-a" and cmd[cmd.index("--master_port") + 1] == "29999"
    assert "--no_local_rank" in cmd[:i]


def test_deepspeed_no_ssh_one_command_per_node(capsys, hostfile):
    cmds = dry(capsys, "--hostfile", hostfile, "--no-ssh", "--master-addr", "10.0.0.1", *TRAIN)
    assert [c[c.index("--node_rank") + 1] for c in cmds] == ["0", "1"]
    assert all("--no_ssh" in c and c[c.index("--master_addr") + 1] == "10.0.0.1" for c in cmds)


def test_include_limits_slots(capsys, hostfile):
    (cmd,) = dry(capsys, "--hostfile", hostfile, "--nproc-per-node", "1", *TRAIN)
    assert cmd[cmd.index("--include") + 1] == "node-a:0@node-b:0"


def test_torchrun_per_node(capsys, hostfile):
    cmds = dry(capsys, "--hostfile", hostfile, "--starter", "torchrun", *TRAIN)
    for rank, c in enumerate(cmds):
        assert c[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert c[c.index("--nnodes") + 1] == "2" and c[c.index("--node_rank") + 1] == str(rank)
        assert c[c.index("--nproc_per_node") + 1] == "2"
        assert c[c.index("-m", 3) :] == [
            "-m",
            "alps_ds",
            "train",
            "--config",
            "configs/tiny.yaml",
            "--set",
            "output.dir=/tmp/x y",
        ]


def test_mpirun_with_hosts(capsys, hostfile):
    (cmd,) = dry(capsys, "--hostfile", hostfile, "--mpi", "--mpi-flavor", "mpich", *TRAIN)
    assert cmd[:3] == [str(BIN / "mpirun"), "-np", "4"]
    assert cmd[cmd.index("-hosts") + 1] == "node-a:2,node-b:2"
    assert cmd[cmd.index(sys.executable) :][:3] == [sys.executable, "-m", "alps_ds.launcher.discover"]
    (ompi,) = dry(capsys, "--hostfile", hostfile, "--mpi", "--mpi-flavor", "openmpi", *TRAIN)
    assert ompi[ompi.index("--host") + 1] == "node-a:2,node-b:2" and "MASTER_PORT=29500" in ompi


def test_slurm_reads_job_and_writes_hostfile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(BIN))  # no scontrol here: the built-in parser expands the list
    for key, value in {
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_GPUS_PER_NODE": "h100:4",
        "SLURM_JOB_ID": "42",
    }.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "hf.slurm"
    cmds = dry(capsys, "--slurm", "--hostfile-out", str(out), *TRAIN)
    assert [c[c.index("--node_rank") + 1] for c in cmds] == ["0", "1"]
    assert cmds[0][cmds[0].index("--master_addr") + 1] == "gpu01"
    assert not out.exists()  # a dry run writes nothing
    # A real (non-dry) launch writes the hostfile before anything else; stop it at pre-flight.
    assert main(["launch", "--slurm", "--hostfile-out", str(out), "--tp", "3", *TRAIN]) == 1
    assert out.read_text().splitlines()[1:] == ["gpu01 slots=4", "gpu02 slots=4"]


def test_per_node_commands_need_a_node_rank(hostfile):
    with pytest.raises(AlpsError, match="--node-rank"):
        from alps_ds.cli import build_parser
        from alps_ds.commands.launch import _mine, plan_commands

        args = build_parser().parse_args(["launch", "--hostfile", hostfile, "--no-ssh", *TRAIN])
        cmds = plan_commands(args)[0]
        _mine(cmds, None)


def test_bad_hostfile_is_one_clean_line(tmp_path, capsys):
    bad = tmp_path / "hf"
    bad.write_text("node1 slots=2\nnode2 gpus=2\n")
    assert main(["launch", "--hostfile", str(bad), "--dry-run", *TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2:" in err and "HOST slots=N" in err


# ---- rank discovery ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "expect"),
    [
        (
            {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            ("openmpi", 5, 8, 1),
        ),
        ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}, ("pmi", 3, 4, 1)),
        ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, ("slurm", 9, 16, 1)),
    ],
)
def test_discovery_from_environment(env, expect):
    info = discover({**env, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "1234"}, use_mpi=False)
    assert (info.source, info.rank, info.world_size, info.local_rank) == expect
    out: dict[str, str] = {}
    export_env(info, out)
    assert out == {
        "RANK": str(expect[1]),
        "WORLD_SIZE": str(expect[2]),
        "LOCAL_RANK": str(expect[3]),
        "MASTER_ADDR": "10.1.1.1",
        "MASTER_PORT": "1234",
    }


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({}, "no rank found"),
        ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "not an integer"),
        ({"PMI_RANK": "2", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h"}, "outside world size"),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}, "MASTER_ADDR is unset"),
    ],
)
def test_discovery_errors(env, words):
    with pytest.raises(AlpsError, match=words):
        discover(env, use_mpi=False)


def test_discovery_under_real_mpirun():
    """mpich's mpirun starts two processes; mpi4py confirms PMI_* and finds local ranks and rank 0's address."""
    proc = subprocess.run(
        [str(BIN / "mpirun"), "-np", "2", sys.executable, "-m", "alps_ds.launcher.discover", "--print"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=rank_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Two processes print at once through mpirun: their lines may run together, so pick out each object.
    infos = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)), key=lambda i: i["rank"])
    assert [i["rank"] for i in infos] == [0, 1] and {i["world_size"] for i in infos} == {2}
    assert sorted(i["local_rank"] for i in infos) == [0, 1]
    assert infos[0]["source"].endswith("+mpi4py") and infos[0]["master_addr"] == infos[1]["master_addr"]
    # Rank 0's address is what ranks on other nodes dial: never a loopback one (this VM's /etc/hosts maps
    # its hostname to 127.0.0.1, as Debian's maps it to 127.0.1.1); the hostname when nothing else resolves.
    addr = infos[0]["master_addr"]
    assert addr == socket.gethostname() or not ipaddress.ip_address(addr).is_loopback


# ---- pre-flight ----------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    cfg = tiny_config("llama", layers=2, hidden=64, heads=4, kv_heads=2)
    cfg.save_pretrained(tmp_path / "m")
    spec = AttentionSpec.from_config(cfg)
    HeadSelection(spec.fingerprint, ((0, 0), (0, 1), (1, 0)), Provenance("explicit")).save(tmp_path / "heads.json")
    other = AttentionSpec.from_config(tiny_config("llama", layers=3, hidden=64, heads=4, kv_heads=2))
    HeadSelection(other.fingerprint, ((2, 0),), Provenance("explicit")).save(tmp_path / "other.json")
    return tmp_path


def statuses(findings):
    return {f.check: f.status for f in findings}


def test_preflight_all_ok(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inp = CheckInputs(
        world_size=4,
        tp=2,
        model=str(model_dir / "m"),
        heads=str(model_dir / "heads.json"),
        gpu_mem_gib=1,
        seq_len=64,
        output_dir=str(model_dir / "new" / "out"),
        master_addr="127.0.0.1",
        master_port=port,
    )
    got = statuses(run_checks(inp))
    assert got == {
        "world size": "ok",
        "weights": "skip",  # the folder holds config.json only
        "selection": "ok",
        "tensor parallel": "ok",
        "balance": got["balance"],
        "memory": "ok",
        "output dir": "ok",
        "master port": "ok",
    }
    assert got["balance"] in ("ok", "warn")


def test_preflight_failures_each_named(model_dir):
    out_file = model_dir / "a_file"
    out_file.write_text("x")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        inp = CheckInputs(
            world_size=6,
            tp=4,
            model=str(model_dir / "m"),
            heads=str(model_dir / "other.json"),
            gpu_mem_gib=1e-6,
            seq_len=64,
            output_dir=str(out_file / "sub"),
            master_addr="127.0.0.1",
            master_port=busy.getsockname()[1],
        )
        findings = run_checks(inp)
    got = statuses(findings)
    assert got["world size"] == "fail" and got["selection"] == "fail" and got["tensor parallel"] == "fail"
    assert got["output dir"] == "fail" and got["master port"] == "fail"
    text = "\n".join(f.line() for f in findings)
    assert "not divisible by tp x pp" in text and "made for another model" in text and "in use" in text


def test_preflight_memory_and_imbalance(model_dir):
    inp = CheckInputs(
        world_size=2,
        tp=2,
        model=str(model_dir / "m"),
        heads=str(model_dir / "heads.json"),
        gpu_mem_gib=1e-6,
        seq_len=64,
        max_imbalance=1.0,
    )
    got = {f.check: f for f in run_checks(inp)}
    assert got["memory"].status == "fail" and "does not fit" in got["memory"].detail
    # heads (0,0),(0,1),(1,0) all read kv group 0: TP rank 0 trains everything.
    assert got["balance"].status == "fail" and "max/mean 2.00" in got["balance"].detail


def test_check_plans_every_head_for_selection_method_all(model_dir, capsys):
    """selection.method all trains every head: the memory check must not plan the 10 % of selection.ratio.
    The GPU size is picked between the two plans, so only the all-heads plan fails."""
    from alps_ds.plan import Activation, GiB, Parallel, load_config, make_plan

    run = {
        "model": {"path": str(model_dir / "m")},
        "selection": {"method": "all", "ratio": 0.1},
        "data": {"datasets": [{"path": "configs/data/tiny.jsonl"}], "max_length": 64},
        "train": {"micro_batch": 1, "batch": 2},
    }
    (model_dir / "run.yaml").write_text(json.dumps(run))

    def total(ratio: float) -> int:
        shape = Activation(seq_len=64, micro_batch=1, checkpointing=False)
        plan = make_plan(
            load_config(str(model_dir / "m")),
            ratio=ratio,
            parallel=Parallel(dp=2, zero=2),
            activation=shape,
            dtype="fp32",
        )
        return plan.rows[0].total

    assert total(0.1) < total(1.0)
    gpu_mem = (total(0.1) + total(1.0)) / 2 / 0.9 / GiB  # 10 % headroom
    code = main(["check", "--config", str(model_dir / "run.yaml"), "--world-size", "2", "--gpu-mem", str(gpu_mem)])
    assert code == 1 and "FAIL memory: does not fit" in capsys.readouterr().err


def test_checks_lacking_inputs_say_skip_and_bad_sizes_fail_cleanly(model_dir):
    """A check without its inputs is a SKIP line, never silently absent; --tp 0 is a FAIL line, not a
    ZeroDivisionError traceback from the memory check."""
    got = statuses(run_checks(CheckInputs(world_size=2, gpu_mem_gib=80)))  # no --model
    assert got["tensor parallel"] == got["memory"] == "skip"
    got = statuses(run_checks(CheckInputs(world_size=2, tp=0, model=str(model_dir / "m"), gpu_mem_gib=80)))
    assert got["world size"] == got["tensor parallel"] == "fail" and got["memory"] == "skip"


def test_memory_check_errors_name_the_setting_not_a_plan_flag(model_dir):
    """ZeRO stage, offload and train_others often come from the run YAML (its deepspeed config, its
    train_others key), and check has no --train-others: the FAIL line names the setting itself."""
    base = dict(world_size=2, model=str(model_dir / "m"), gpu_mem_gib=80)
    got = {f.check: f for f in run_checks(CheckInputs(**base, zero=0, offload=True))}
    assert got["memory"].status == "fail" and got["memory"].detail.startswith("offload needs zero 1, 2 or 3, not 0")
    got = {f.check: f for f in run_checks(CheckInputs(**base, train_others=("nope",)))}
    assert got["memory"].status == "fail"
    assert got["memory"].detail.startswith("train_others 'nope' matches no parameter outside Q/K/V")


def test_launch_stops_before_launching_on_failed_check(hostfile, tmp_path, capsys):
    marker = tmp_path / "ran"
    script = tmp_path / "touch.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = main(
        ["launch", "--hostfile", hostfile, "--tp", "3", "--node-rank", "0", "--no-ssh", "--script", str(script)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "FAIL world size" in err and "nothing was launched" in err
    assert not marker.exists()


def test_launch_preflight_reads_train_set_overrides(tmp_path, capsys):
    """``--set`` after '--' changes what train runs, so the pre-flight checks the overridden run config."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code = main(["launch", "--tp", "3", "--", "--config", "configs/tiny.yaml", "--set", f"output.dir={a_file}/out"])
    err = capsys.readouterr().err
    assert code == 1 and f"FAIL output dir: {a_file} is a file" in err


@pytest.mark.parametrize(
    ("deepspeed", "planned"),
    [
        (None, (2, False, "fp32")),  # train's default DeepSpeed config: ZeRO-2, fp32
        (
            {"zero_optimization": {"offload_optimizer": {"device": "none"}}, "bf16": {"enabled": False}},
            (0, False, "fp32"),
        ),
        ("configs/ds_zero3_offload.json", (3, True, "bf16")),
    ],
)
def test_check_plans_memory_for_what_the_run_config_trains(model_dir, capsys, deepspeed, planned):
    """The memory check plans the job train will run: data.max_length x train.micro_batch, its activation
    checkpointing, and the ZeRO stage (0 when the DS config has none), precision and offload as train reads them."""
    from alps_ds.plan import Activation, Parallel, load_config, make_plan

    run = {
        "model": {"path": str(model_dir / "m")},
        "selection": {"heads": str(model_dir / "heads.json")},
        "data": {"datasets": [{"path": "configs/data/tiny.jsonl"}], "max_length": 200},
        "train": {"micro_batch": 3, "batch": 6, "gradient_checkpointing": False},
        "deepspeed": deepspeed,
        "output": {"dir": str(model_dir / "out")},
    }
    (model_dir / "run.yaml").write_text(json.dumps(run))  # JSON is YAML
    assert main(["check", "--config", str(model_dir / "run.yaml"), "--world-size", "2", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    zero, offload, dtype = planned
    plan = make_plan(
        load_config(str(model_dir / "m")),
        heads=[(0, 0), (0, 1), (1, 0)],
        parallel=Parallel(dp=2, zero=zero, offload=offload),
        activation=Activation(seq_len=200, micro_batch=3, checkpointing=False),
        dtype=dtype,
        gpu_mem_gib=80,
    )
    offloaded = " + offload" if offload else ""
    want = f"{plan.verdict(plan.rows[0])} per GPU, ZeRO-{zero}{offloaded}, {dtype}, seq 200 x micro batch 3"
    assert f"OK   memory: {want}, checkpointing off" in out


def test_shipped_70b_run_config_passes_preflight_on_64_gpus(tmp_path, capsys):
    """configs/llama-3.1-70b.yaml with a 10 % selection fits 64 x 80 GB; the same job without
    activation checkpointing is refused before launch (the memory line says why)."""
    from alps_ds.choose import count_for_ratio, random_heads

    model = REPO / "configs" / "models" / "llama-3.1-70b.json"
    spec = AttentionSpec.from_pretrained(model)
    k = count_for_ratio(0.1, spec.num_layers, spec.num_heads)
    heads = HeadSelection(spec.fingerprint, random_heads(spec.num_layers, spec.num_heads, k, 0), Provenance("random"))
    heads.save(tmp_path / "heads.json")
    argv = ["check", "--config", "configs/llama-3.1-70b.yaml", "--model", str(model), "--world-size", "64"]
    argv += ["--gpu-mem", "80", "--output-dir", str(tmp_path / "out"), "--heads", str(tmp_path / "heads.json")]
    assert main(argv) == 0
    assert "OK   memory: fits" in capsys.readouterr().out
    config = tmp_path / "no-ckpt.yaml"
    text = (REPO / "configs" / "llama-3.1-70b.yaml").read_text()
    config.write_text(text.replace("gradient_checkpointing: true", "gradient_checkpointing: false"))
    assert main([*argv[:2], str(config), *argv[3:]]) == 1
    err = capsys.readouterr().err
    assert "FAIL memory: does not fit" in err and "checkpointing off" in err and "try activation checkpointing" in err
