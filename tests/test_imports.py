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
