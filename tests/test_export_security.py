"""planner export with hostile values (a plan or spec someone sends, a hostfile, CLI flags):
each value is either refused with one line naming it, or survives as one literal argument.

The generated scripts are checked by bash itself: `bash -n` parses them, and they are run with
fake `srun` / `scontrol` / `torchrun` on PATH; each fake torchrun call writes its argv
(NUL-separated, so that a newline inside an argument is kept) to a file of its own, which must
hold exactly the expected arguments, and no hostile command may have run
(each one would create a marker file)."""

import dataclasses
import os
import shutil
import subprocess

import pytest

from planner import export
from planner.cli import main
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

MARK = "PWNED"  # every hostile command below would create a file so named (or PWNED-...)


def _hostile() -> list:
    return [f"x\ntouch {MARK}", f"$(touch {MARK})", f"`touch {MARK}`", f"a; touch {MARK}",
            f"a && touch {MARK} #", f"a | touch {MARK}", f"it's \"quoted\" '$(touch {MARK})'",
            "with  two spaces", "ünïcødé-模型", "${IFS}*?[a]~", "trailing\\",
            "-starts-with-dash", f"\\\"; touch {MARK}; echo \\\"", f"$'\\n'touch {MARK}",
            "tab\there", "{a,b}"]


HOSTILE = _hostile()
# a model name with a control character is refused when the spec is built (planner/schema.py);
# the exporters must still quote every printable hostile name
HOSTILE_NAMES = [h for h in HOSTILE if h.isprintable()]


def _plan(nodes=2, name=None) -> Plan:
    model = load_model("llama2-7b")
    if name is not None:
        model = dataclasses.replace(model, name=name)
    layout = Layout(dp=nodes * 8, tp=1, pp=1, zero_stage=1, micro_batch=1, num_microbatches=1,
                    schedule="1f1b", virtual_stages=1, recompute="none")
    return Plan(model=model, cluster=load_cluster("a100-80g", nodes),
                job=Job(global_batch=nodes * 8, seq_len=2048, precision="bf16"), layout=layout)


@pytest.fixture
def fake_bin(tmp_path):
    """A folder with fake srun (skips its own options, writing them to srun beside $ARGV_DIR;
    runs its command as node 1), scontrol (lists two hosts) and torchrun (writes its argv,
    NUL-separated, to a new file in $ARGV_DIR)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "${1:-}" == --* ]]; do printf "%s\\0" "$1" '
                '>> "$ARGV_DIR/../srun"; shift; done\n'
                'export SLURM_NODEID=1\nexec "$@"\n',
        "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 3\n'
                    'printf "head-node\\nother-node\\n"\n',
        "torchrun": '#!/bin/bash\nn=$(find "$ARGV_DIR" -type f | wc -l)\n'
                    'printf "%s\\0" "$@" > "$ARGV_DIR/call$n"\n',
    }
    for name, text in scripts.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return bindir


def _run_bash(script: str, fake_bin, cwd, **env) -> list:
    """Parse then run `script` with bash; the argv lists of every fake torchrun call."""
    parsed = subprocess.run(["bash", "-n"], input=script.encode(), capture_output=True,
                            check=False)
    assert parsed.returncode == 0, parsed.stderr.decode() + script
    calls = cwd / "calls"
    shutil.rmtree(calls, ignore_errors=True)
    (cwd / "srun").unlink(missing_ok=True)
    calls.mkdir()
    full_env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
                "ARGV_DIR": str(calls), "SLURM_JOB_NODELIST": "head-node,other-node",
                "SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "64", **env}
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=full_env, capture_output=True,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert not list(cwd.glob(f"{MARK}*")), f"a command ran from:\n{script}"
    return [(calls / f"call{i}").read_bytes().decode().split("\0")[:-1]
            for i in range(len(list(calls.iterdir())))]


def _one_line_refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _sbatch_header(script: str) -> list:
    """The lines sbatch reads directives from: up to the first line that is not a comment."""
    head = []
    for line in script.splitlines():
        if line and not line.startswith("#"):
            break
        head.append(line)
    return head


# ---- Slurm: names in #SBATCH lines ----------------------------------------------------------

@pytest.mark.parametrize("name", [h for h in HOSTILE if not h.isprintable()])
def test_a_model_name_with_a_control_character_is_refused(name):
    assert repr(name) in _one_line_refusal(_plan, name=name)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_slurm_derives_a_safe_job_name_from_any_model_name(name, fake_bin, tmp_path):
    plan = _plan(name=name)
    script = export.slurm(plan, plan_path="plan.json", steps=3)
    job = export.default_job_name(plan)
    assert set(job) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert job.endswith("-dp16tp1pp1") and not job.startswith("-")
    assert _sbatch_header(script) == [
        "#!/bin/bash", f"#SBATCH --job-name={job}", "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=24:00:00",
        "#SBATCH --exclusive", ""]
    (argv,) = _run_bash(script, fake_bin, tmp_path)
    assert argv == ["--nproc-per-node", "8", "--nnodes", "2", "--rdzv-id", "4242",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "head-node:29500",
                    "-m", "runtime.train", "--plan", "plan.json", "--steps", "3"]
    srun = (tmp_path / "srun").read_bytes().decode().split("\0")[:-1]
    assert srun == ["--kill-on-bad-exit=1", "--cpus-per-task=64"]


def test_default_job_name_keeps_safe_model_names():
    assert export.default_job_name(_plan(name="llama2-7b")) == "llama2-7b-dp16tp1pp1"
    assert export.default_job_name(_plan(name="a b/c")) == "a-b-c-dp16tp1pp1"
    assert export.default_job_name(_plan(name="模型")) == "plan-dp16tp1pp1"


@pytest.mark.parametrize("value", [h for h in HOSTILE if h != "-starts-with-dash"]
                         + ["", "a/b", "a=b"])
@pytest.mark.parametrize("key", ["job_name", "partition", "time_limit"])
def test_slurm_refuses_unsafe_directive_values(key, value):
    assert repr(value) in _one_line_refusal(export.slurm, _plan(), **{key: value})


@pytest.mark.parametrize("time_limit", ["30", "90:00", "24:00:00", "2-0", "2-12", "2-12:30",
                                        "1-00:00:00", "UNLIMITED", "infinite"])
def test_slurm_accepts_slurm_time_formats(time_limit):
    assert f"#SBATCH --time={time_limit}" in export.slurm(_plan(), time_limit=time_limit)


@pytest.mark.parametrize("time_limit", ["24:00:00\n#SBATCH --uid=0", "1:2:3:4", "1-2-3", "-1",
                                        "1h", " 30"])
def test_slurm_refuses_other_times(time_limit):
    _one_line_refusal(export.slurm, _plan(), time_limit=time_limit)


def test_slurm_accepts_safe_names_and_partition_lists():
    script = export.slurm(_plan(), job_name="my_job.v2-1", partition="gpu,debug")
    assert "#SBATCH --job-name=my_job.v2-1" in script.splitlines()
    assert "#SBATCH --partition=gpu,debug" in script.splitlines()
    script = export.slurm(_plan(), job_name="-x")  # after '=': a value, not an option
    assert "#SBATCH --job-name=-x" in script.splitlines()
    assert "longer than 128" in _one_line_refusal(export.slurm, _plan(), job_name="x" * 129)
    _one_line_refusal(export.slurm, _plan(), partition="gpu,")


@pytest.mark.parametrize("port,steps", [("29500; id", 5), (0, 5), (70000, 5), (True, 5),
                                        (29500, "5; id"), (29500, 0), (29500, 2.5)])
def test_ports_and_steps_must_be_integers(port, steps):
    _one_line_refusal(export.slurm, _plan(), master_port=port, steps=steps)
    _one_line_refusal(export.torchrun_lines, _plan(), master_port=port, steps=steps)


# ---- plan paths: quoted, arrive as one argument --------------------------------------------

@pytest.mark.parametrize("path", HOSTILE + ["/shared/plans/run 1/plan.json"])
def test_slurm_plan_path_arrives_literally(path, fake_bin, tmp_path):
    (argv,) = _run_bash(export.slurm(_plan(), plan_path=path), fake_bin, tmp_path)
    assert argv[argv.index("--plan") + 1] == path and argv[-2:] == ["--steps", "50"]
    assert len(argv) == 16


@pytest.mark.parametrize("path", HOSTILE)
@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_plan_path_arrives_literally(path, nodes, fake_bin, tmp_path):
    lines = export.torchrun_lines(_plan(nodes=nodes), plan_path=path, steps=4,
                                  hosts=["n0", "n1"][:nodes] if nodes > 1 else None)
    assert len(lines) == nodes
    for text in lines:
        (argv,) = _run_bash(text, fake_bin, tmp_path)
        tail = ["-m", "runtime.train", "--plan", path, "--steps", "4"]
        if nodes == 1:
            assert argv == ["--standalone", "--nproc-per-node", "8"] + tail
        else:
            assert argv == ["--nproc-per-node", "8", "--nnodes", "2", "--rdzv-id",
                            "llama2-7b-dp16tp1pp1", "--rdzv-backend", "c10d",
                            "--rdzv-endpoint", "n0:29500"] + tail
    script = export.torchrun(_plan(nodes=nodes), plan_path=path)
    assert len(_run_bash(script, fake_bin, tmp_path)) == nodes


def test_plan_path_with_nul_is_refused():
    _one_line_refusal(export.torchrun_lines, _plan(), plan_path="a\0b")
    _one_line_refusal(export.slurm, _plan(), plan_path="")


def test_torchrun_master_addr_placeholder_expands_on_the_node(fake_bin, tmp_path):
    lines = export.torchrun_lines(_plan(), steps=2)
    for text in lines:
        (argv,) = _run_bash(text, fake_bin, tmp_path, MASTER_ADDR="10.1.2.3")
        assert argv[argv.index("--rdzv-endpoint") + 1] == "10.1.2.3:29500"
        assert "--node-rank" not in argv


# ---- hosts: hostfile entries and --master-addr ---------------------------------------------

@pytest.mark.parametrize("host", HOSTILE + ["$MASTER_ADDR", "h0:29500", "-oProxyCommand=id",
                                            "h0.", ".h0", "h0/24"])
def test_hostile_hosts_are_refused(host, tmp_path):
    plan = _plan()
    _one_line_refusal(export.torchrun_lines, plan, hosts=[host, "n1"])
    _one_line_refusal(export.torchrun_lines, plan, hosts=["n0", "n1"], master_addr=host)
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"# cluster\nn0 slots=8\n{host} slots=8\n")
    assert "line " in _one_line_refusal(export.read_hostfile, str(hostfile))


def test_hostfile_line_with_an_expansion_is_refused(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n0\n$(touch /tmp/x) slots=8\n")
    msg = _one_line_refusal(export.read_hostfile, str(hostfile))
    assert "line 2" in msg and "'$(touch'" in msg


def test_host_names_and_addresses_are_accepted(fake_bin, tmp_path):
    for host, endpoint in [("node-01.cluster.local", "node-01.cluster.local:29500"),
                           ("gpu_07", "gpu_07:29500"), ("10.0.0.1", "10.0.0.1:29500"),
                           ("fe80::1", "[fe80::1]:29500"), ("[::1]", "[::1]:29500")]:
        (text, _) = export.torchrun_lines(_plan(), hosts=[host, "n1"])
        (argv,) = _run_bash(text, fake_bin, tmp_path)
        assert argv[argv.index("--rdzv-endpoint") + 1] == endpoint


# ---- everything together: export_all and the CLI -------------------------------------------

@pytest.mark.parametrize("name", [f"x; touch {MARK}", f"$(touch {MARK})", "ünïcødé"])
def test_export_all_with_a_hostile_model_name(name, fake_bin, tmp_path):
    files = export.export_all(_plan(name=name))
    assert not any(text.startswith("# not exported") for text in files.values())
    assert len(_run_bash(files["job.slurm"], fake_bin, tmp_path)) == 1
    assert len(_run_bash(files["launch_torchrun.sh"], fake_bin, tmp_path,
                         MASTER_ADDR="h0")) == 2


def test_cli_refuses_and_quotes(tmp_path, capsys, fake_bin):
    path = tmp_path / "plan.json"
    _plan(name=f"evil $(touch {MARK})").save(path)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n0\n`touch PWNED`\n")
    for extra in (["--to", "torchrun", "--nodes-hostfile", str(hostfile)],
                  ["--to", "torchrun", "--master-addr", "h0;id"],
                  ["--to", "slurm", "--job-name", f"j\ntouch {MARK}"],
                  ["--to", "slurm", "--partition", "gpu $(id)"],
                  ["--to", "slurm", "--time", "1:00:00\n#SBATCH --uid=0"]):
        assert main(["export", str(path)] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("planner export: error: ")
    out = tmp_path / "job.slurm"
    odd = str(tmp_path / "it's a $(touch PWNED) plan.json")
    assert main(["export", str(path), "--to", "slurm", "--plan-path", odd, "--out", str(out),
                 "--job-name", "safe-name", "--partition", "gpu", "--time", "2-00:00:00"]) == 0
    script = out.read_text()
    assert "#SBATCH --job-name=safe-name" in _sbatch_header(script)
    (argv,) = _run_bash(script, fake_bin, tmp_path)
    assert argv[argv.index("--plan") + 1] == odd


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_shellcheck_finds_nothing(name, tmp_path):
    plan = _plan(name=name)
    for text in (export.slurm(plan, plan_path=name), export.torchrun(plan, plan_path=name)):
        # SC2016 ("expressions don't expand in single quotes") and SC1003 ("want to escape a
        # single quote?") flag a literal '$(..)' or '\\' inside quotes: that is the point here
        done = subprocess.run(["shellcheck", "-s", "bash", "-e", "SC2016,SC1003", "-"],
                              input=text.encode(), capture_output=True, check=False)
        assert done.returncode == 0, done.stdout.decode() + text
