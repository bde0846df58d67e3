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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default ("(default: bf16)"), unless the text already
    names it or there is none to show (no default, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or default is argparse.SUPPRESS or isinstance(default, bool)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (no usage dump), exit code 2; --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(one_line(f"{self.prog}: error: {message}"), file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="planner", description="Plan, simulate and run parallel transformer training.",
        epilog="`planner COMMAND --help` shows a command's flags and their defaults.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"planner.cli.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    """Run one sub-command.  Exit codes: 0 success, 2 a user error or any failure (one line on
    stderr naming the command; `--debug` adds the traceback), 130 interrupted (Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]  # accepted anywhere before `--`
    if debug:
        argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
        cut = argv.index("--") if "--" in argv else len(argv)
    command = next((a for a in argv[:cut] if a in COMMANDS), None)
    try:
        return _dispatch(argv, cut, debug)
    except KeyboardInterrupt:
        return 130  # quietly, as a shell expects of Ctrl-C
    except BrokenPipeError:  # the reader of standard output went away (`| head`)
        _silence_stdout()
        return 0
    except ValueError as exc:
        return _fail(command, str(exc), debug)
    except OSError as exc:  # the system's answer (disk full, permission denied): one line
        return _fail(command, describe(exc), debug)
    except Exception as exc:  # a failure no check caught: still one line, still exit code 2
        return _fail(command, describe(exc), debug, hint=True)


def _dispatch(argv: list, cut: int, debug: bool = False) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (accepted anywhere)")
    if not argv:  # a bare `planner`: the commands, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:cut])
    args.given = given_flags(parser, argv[:cut])  # what came from a flag, not a default
    args.debug = debug  # `planner run --debug` passes it on to the ranks
    args.passthrough = argv[cut + 1:]  # `planner run plan.json -- <runtime.train flags>`
    if args.passthrough and args.command != "run":
        parser.error(f"arguments after -- are only for `planner run`: {args.passthrough}")
    _check_outputs(args)
    return args.run(args) or 0


def _parsers(parser) -> list:
    """`parser` and every sub-command's parser."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += _parsers(child)
    return found


def given_flags(parser, argv: list) -> set:
    """The dests that `argv` sets on the command line (the rest hold their defaults): `argv`
    parsed again with every default replaced by a marker.  It parsed once already, so this
    parse neither fails nor prints."""
    unset = object()
    saved = [(a, a.default) for p in _parsers(parser) for a in p._actions
             if a.default is not argparse.SUPPRESS]
    try:
        for action, _ in saved:
            action.default = unset
        namespace = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return {dest for dest, value in vars(namespace).items() if value is not unset}


# Flags naming a file a command writes: checked before the command does any work.
OUTPUT_FLAGS = {"out": "--out", "html": "--html", "trace": "--trace"}
COMMAND_OUTPUT_FLAGS = {"run": {"measured": "--measured"}}


def _check_outputs(args) -> None:
    from planner.cli.common import check_output
    flags = {**OUTPUT_FLAGS, **COMMAND_OUTPUT_FLAGS.get(args.command, {})}
    for dest, flag in flags.items():
        path = getattr(args, dest, None)
        if isinstance(path, str):
            check_output(path, flag)


def describe(exc: BaseException) -> str:
    """One line for an exception that is not a ValueError (those are the user errors)."""
    if isinstance(exc, OSError):
        from planner.schema import show_path
        where = f": {show_path(exc.filename)}" if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__}{where}"
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply"
    if isinstance(exc, MemoryError):
        return "out of memory (an input is too large)"
    if isinstance(exc, (OverflowError, ZeroDivisionError)):
        return f"a number is out of range ({type(exc).__name__}: {exc})"
    return f"internal error ({type(exc).__name__}: {exc})"


def one_line(text: str, limit: int = 2000) -> str:
    """`text` as one line: control characters escaped, cut at `limit` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def _fail(command, message: str, debug: bool, hint: bool = False) -> int:
    if debug:
        import traceback
        traceback.print_exc()
    name = f"planner {command}" if command else "planner"
    more = " (--debug shows the traceback)" if hint and not debug else ""
    print(one_line(f"{name}: error: {message}") + more, file=sys.stderr)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # an in-process stdout without a descriptor
        pass
