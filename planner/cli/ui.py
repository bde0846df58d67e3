"""`planner ui`: start the Streamlit planning page (app/streamlit_app.py) in a subprocess."""

import subprocess
import sys
from pathlib import Path

from planner.cli.common import print_json, require_module

APP = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"


def add_parser(sub):
    p = sub.add_parser("ui", help="open the Streamlit planning UI in a browser")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the address and the command) before serving; "
                        "Streamlit's own output goes to standard error")
    return p


def command(args) -> list:
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
           "--browser.gatherUsageStats", "false", "--server.maxUploadSize", "1"]
    if args.headless:
        cmd += ["--server.headless", "true"]
    return cmd


def run(args) -> int:
    if not APP.is_file():
        raise ValueError(f"the app is not installed with this package: {APP} is missing")
    require_module("streamlit", "the UI")
    cmd = command(args)
    if args.json:
        print_json({"url": f"http://localhost:{args.port}", "port": args.port,
                    "app": str(APP), "command": cmd})
        sys.stdout.flush()
    try:
        return subprocess.call(cmd, stdout=2 if args.json else None)
    except KeyboardInterrupt:
        return 0
