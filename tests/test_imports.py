import subprocess
import sys


def test_import_planner_does_not_import_torch_or_streamlit():
    code = ("import sys, planner, planner.cli, planner.cost.estimate, planner.report;"
            "import planner.cli.estimate;"
            "print(' '.join(m for m in ('torch', 'streamlit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_parser_builds_without_torch():
    code = ("import sys; from planner.cli import build_parser; build_parser();"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- start-up: each command imports what it uses, when it runs ---------------------------------

HEAVY = ("numpy", "pandas", "networkx", "torch", "streamlit", "altair", "vl_convert",
         "planner.cost.estimate", "planner.search.ranking", "planner.sim.timeline",
         "planner.calibration.compare")

# a fresh interpreter runs `planner ARGV...` (main(), as the console script does) and reports
# its exit code, its output and which of HEAVY it imported
RUNNER = f"""
import contextlib, io, json, sys
from planner.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"code": code, "out": out.getvalue(),
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _planner(*argv, cwd=None) -> dict:
    import json
    import os
    from pathlib import Path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this tree
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True,
                          check=True, cwd=cwd, env=env)
    return json.loads(proc.stdout.splitlines()[-1])


def test_help_models_profiles_and_version_load_no_numpy_pandas_or_networkx():
    import planner
    for argv, expect in ((["--help"], "simulate"), (["models"], "llama3-8b"),
                         (["profiles"], "a100-80g"), (["--version"], planner.__version__)):
        res = _planner(*argv)
        assert res["code"] == 0 and expect in res["out"], (argv, res)
        assert res["loaded"] == [], (argv, res["loaded"])


def test_export_loads_no_pandas_networkx_or_cost_model(tmp_path):
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Layout, Plan
    from planner.presets import MODEL_PRESETS
    Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("cpu", 1),
         job=Job(global_batch=32, seq_len=256, precision="fp32"),
         layout=Layout(dp=2, tp=2, pp=2, micro_batch=4, num_microbatches=4,
                       zero_stage=1)).save(tmp_path / "plan.json")
    for fmt, expect in (("torchrun", "runtime.train"), ("deepspeed", "train_batch_size")):
        res = _planner("export", "plan.json", "--to", fmt, cwd=tmp_path)
        assert res["code"] == 0 and expect in res["out"], res
        # a plan's validation rules are numpy columns (planner.rules): numpy is expected here
        assert set(res["loaded"]) <= {"numpy"}, res["loaded"]


def test_the_commands_that_compute_load_their_libraries_when_they_run():
    res = _planner("estimate", "--model", "tiny", "--cluster", "cpu", "--global-batch", "8",
                   "--seq-len", "64", "--dp", "8", "--json")
    assert res["code"] == 0 and "planner.cost.estimate" in res["loaded"]
    assert not {"pandas", "torch", "streamlit", "altair"} & set(res["loaded"])


def test_suggest_loads_no_pandas_or_networkx():
    """The ranked table is laid out without pandas; networkx only for NVLink-mesh nodes."""
    res = _planner("suggest", "--model", "llama2-7b", "--cluster", "a100-80g", "--global-batch",
                   "64", "--seq-len", "4096", "--top", "3")
    assert res["code"] == 0 and "Why each beats the next" in res["out"]
    assert "planner.search.ranking" in res["loaded"]
    assert not {"pandas", "networkx", "torch", "streamlit", "altair"} & set(res["loaded"])


def test_version_flag_of_the_installed_command():
    import planner
    out = subprocess.run([sys.executable, "-m", "planner.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"planner {planner.__version__}"


def test_suggest_objectives_are_the_searchs():
    from planner.cli.suggest import OBJECTIVES
    from planner.search.ranking import OBJECTIVES as SEARCH_OBJECTIVES
    assert OBJECTIVES == SEARCH_OBJECTIVES


def test_planner_imports_without_altair_or_vl_convert():
    code = ("import sys; sys.modules['altair'] = sys.modules['vl_convert'] = None;"
            "import planner.charts, planner.cli.simulate; from planner.cli import build_parser;"
            "build_parser()\n"
            "try:\n    planner.charts.renderer('png')\n"
            "except ValueError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == 'charts need altair: pip install "parallel-planner[charts]"'


# --- the planner without its optional dependencies (pyproject.toml: [runtime], [ui]) -------

# a fresh interpreter in which torch and streamlit cannot be imported (a meta-path finder
# refuses them, as if they were not installed) runs `planner ARGV...`
BLOCKED = """
import contextlib, importlib.abc, io, json, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "streamlit"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
from planner.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}))
"""


def _without_torch(*argv, cwd=None) -> dict:
    import json
    import os
    from pathlib import Path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", BLOCKED, *argv], capture_output=True,
                          text=True, check=True, cwd=cwd, env=env)
    return json.loads(proc.stdout.splitlines()[-1])


def test_estimate_suggest_and_simulate_run_without_torch_or_streamlit(tmp_path):
    import json
    res = _without_torch("estimate", "--model", "tiny", "--cluster", "cpu", "--global-batch",
                         "8", "--seq-len", "64", "--dp", "8", "--json", "--out",
                         str(tmp_path / "plan.json"))
    assert res["code"] == 0 and json.loads(res["out"])["time"]["step_s"] > 0, res
    res = _without_torch("suggest", "--model", "llama2-7b", "--cluster", "a100-80g",
                         "--global-batch", "64", "--seq-len", "4096", "--top", "2", "--json")
    assert res["code"] == 0 and len(json.loads(res["out"])) == 2, res
    res = _without_torch("simulate", str(tmp_path / "plan.json"), "--json")
    assert res["code"] == 0 and json.loads(res["out"])["step_s"] > 0, res


def test_commands_needing_torch_or_streamlit_name_the_extra(tmp_path):
    assert _without_torch("estimate", "--model", "tiny", "--cluster", "cpu", "--global-batch",
                          "8", "--seq-len", "64", "--dp", "8", "--out",
                          str(tmp_path / "plan.json"))["code"] == 0
    for argv, line in (
            (("run", "plan.json", "--steps", "2"), ('planner run: error: training (planner '
             'run) needs torch: pip install "parallel-planner[runtime]"')),
            (("profile", "--out", "p.json"), ('planner profile: error: measuring (planner '
             'profile) needs torch: pip install "parallel-planner[runtime]"')),
            (("ui", "--headless"), ('planner ui: error: the UI needs streamlit: pip install '
             '"parallel-planner[ui]"'))):
        res = _without_torch(*argv, cwd=tmp_path)
        assert res["code"] == 2 and res["err"].strip() == line and res["out"] == "", res
