"""`python -m runtime.launch <torchrun arguments>`: torchrun, with the run's exit code and no
launcher traceback.

torchrun ends every failed run with its own 30-50-line ChildFailedError dump and exit code 1.
Here the same launch (`torch.distributed.run`'s own argument parser and agent) instead exits with
the code of the rank that caused the failure (runtime/faults.py) and prints nothing more when
that rank explained itself (its one line on stderr, and in its TORCHELASTIC_ERROR_FILE); a rank
that died without a word (a signal, a crash) gets one line here. `planner run` starts this with
the command line of planner.export.torchrun_lines. `--debug` among the arguments keeps
torchrun's own logs and dump."""

import logging
import signal
import sys

from runtime import faults

PROG = "runtime.launch"
_NO_ERROR_FILE = "<N/A>"


def _explained(failure) -> bool:
    return failure.error_file != _NO_ERROR_FILE and failure.exitcode > 0


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def verdict(failures: dict) -> tuple:
    """(exit code, line to print or None) for torchrun's {global rank: ProcessFailure}.

    The cause before its consequences: a rank's explained fault (bad input, divergence, other)
    first, then a rank that exited non-zero without a word, then a rank that lost its peer, then
    a rank killed by a signal (SIGTERM last: torchrun sends it to the survivors)."""
    ranks = sorted(failures)

    def first(test):
        return next((r for r in ranks if test(failures[r])), None)

    rank = first(lambda f: _explained(f) and f.exitcode != faults.EXIT_PEER_LOST)
    if rank is not None:
        return failures[rank].exitcode, None
    rank = first(lambda f: f.exitcode > 0 and not _explained(f))
    if rank is not None:
        code = failures[rank].exitcode
        return code, (f"rank {rank} exited with code {code} without a message "
                      f"(see its output above)")
    rank = first(_explained)
    if rank is not None:
        return failures[rank].exitcode, None
    rank = first(lambda f: f.exitcode < 0 and -f.exitcode != signal.SIGTERM)
    if rank is None:
        rank = first(lambda f: f.exitcode < 0)
    if rank is not None:
        failure = failures[rank]
        return faults.EXIT_PEER_LOST, (f"rank {rank} (pid {failure.pid}) was killed by "
                                       f"{_signal_name(failure.exitcode)}")
    return faults.EXIT_OTHER, f"the run failed: {failures}"


def _quiet_torchrun_logs() -> None:
    """torchrun's agent logs every failure and every SIGTERM it sends; the ranks' own lines
    and verdict() say it once."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    args = parse_args(argv)
    if not debug:
        _quiet_torchrun_logs()
    try:
        run(args)
        return faults.EXIT_OK
    except ChildFailedError as exc:
        if debug:
            raise
        code, line = verdict(exc.failures)
        if line:
            faults.report(PROG, code, line)
        return code
    except SignalException as exc:  # SIGINT/SIGTERM/SIGHUP/SIGQUIT to the launcher itself
        return faults.report(PROG, 128 + int(exc.sigval),
                             f"stopped by {exc.sigval.name}; the ranks were stopped too")
    except KeyboardInterrupt:
        return faults.report(PROG, faults.EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:
        if debug:
            raise
        return faults.report(PROG, faults.EXIT_OTHER,
                             f"torchrun failed: {type(exc).__name__}: {faults.one_line(exc)}")


if __name__ == "__main__":
    sys.exit(main())
