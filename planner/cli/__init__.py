"""`planner` command line: parse -> call the library -> report.  User errors print one line and
exit with code 2."""

import argparse
import importlib
import sys

from planner import __version__

# sub-command name -> module in planner.cli; each imports what its command needs (pandas, the
# cost model, the simulator, ...) inside its run(), so building the parser stays cheap
COMMANDS = ["estimate", "models", "profiles", "run", "compare", "profile", "calibrate", "ui",
            "suggest", "simulate", "export"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (no usage dump), exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="planner", description="Plan, simulate and run parallel transformer training.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"planner.cli.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.passthrough = argv[cut + 1:]  # `planner run plan.json -- <runtime.train flags>`
    if args.passthrough and args.command != "run":
        parser.error(f"arguments after -- are only for `planner run`: {args.passthrough}")
    try:
        return args.run(args) or 0
    except ValueError as exc:
        print(f"planner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


