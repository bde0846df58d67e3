"""Exit codes of `runtime.train` and `runtime.launch` (so of `planner run`), and the one-line
report of a fault on a rank.

Importable without torch (the launcher and the argument checks use it before torch loads)."""

import contextlib
import json
import os
import re
import sys
import time
import traceback

EXIT_OK = 0
EXIT_OTHER = 1        # anything not below (a bug, out of memory, a full disk, ...)
EXIT_BAD_INPUT = 2    # bad flag, plan, data or checkpoint; wrong number of processes
EXIT_DIVERGED = 3     # the loss became NaN or infinite
EXIT_PEER_LOST = 4    # a peer died, was killed or stopped answering; a collective timed out
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

CODES = {EXIT_OK: "success", EXIT_OTHER: "other failure", EXIT_BAD_INPUT: "bad input",
         EXIT_DIVERGED: "training diverged", EXIT_PEER_LOST: "peer lost or collective timeout",
         EXIT_INTERRUPTED: "interrupted"}

MAX_MESSAGE = 400

# What gloo / NCCL / the c10d store say when a peer is gone or silent: these arrive as plain
# RuntimeErrors (PyTorch 2.13, gloo: "[.../gloo/transport/tcp/pair.cc:537] Read error ...:
# Connection reset by peer", "[.../unbound_buffer.cc:78] Timed out waiting 3000ms for recv").
_PEER = re.compile(r"gloo/transport|Connection (reset|closed|refused)|Broken pipe|[Tt]imed out|"
                   r"[Tt]imeout|NCCL (error|communicator)|communicator was aborted|"
                   r"Socket|by peer")


class Diverged(Exception):
    """Training cannot go on: the loss is not finite."""


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_peer_fault(exc) -> bool:
    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None) if dist is not None else None
    for e in _chain(exc):
        if dist_error is not None and isinstance(e, dist_error):
            return True
        if isinstance(e, (RuntimeError, ConnectionError, TimeoutError)) and _PEER.search(str(e)):
            return True
    return False


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, Diverged):
        return EXIT_DIVERGED
    if isinstance(exc, ValueError):
        return EXIT_BAD_INPUT
    if _is_peer_fault(exc):
        return EXIT_PEER_LOST
    return EXIT_OTHER


def one_line(text: object) -> str:
    """The first line of an error text, without gloo's '[file.cc:123] ' prefix and advice."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", line)
    line = line.split(" This is typically caused by")[0].rstrip(".")
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 3] + "..."


def describe(exc: BaseException, code: int, timeout_s=None) -> str:
    """One line saying what went wrong (the rank prefix is added by report())."""
    if code == EXIT_INTERRUPTED:
        return "interrupted"
    if code in (EXIT_BAD_INPUT, EXIT_DIVERGED):
        return one_line(exc)
    if code == EXIT_PEER_LOST:
        within = f" (--timeout {timeout_s:g} s)" if timeout_s is not None else ""
        return (f"lost a peer or a collective timed out{within}: "
                f"{one_line(exc) or type(exc).__name__}; see the other ranks' messages")
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    detail = one_line(exc)
    return (f"{type(exc).__name__}{': ' + detail if detail else ''} "
            f"(rerun with --debug for the traceback)")


def rank_label() -> str:
    return f" [rank {os.environ['RANK']}]" if "RANK" in os.environ else ""


def report(prog: str, code: int, message: str) -> int:
    """Write 'prog [rank r]: error: message' to stderr and, under torchrun, to the rank's error
    file (TORCHELASTIC_ERROR_FILE), which tells the launcher that the failure is explained."""
    line = f"{prog}{rank_label()}: error: {message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:  # atomically: torchrun reads the file as soon as the rank is gone
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
            os.replace(tmp, path)
        except OSError:
            pass
    return code


def report_exception(prog: str, exc: BaseException, *, debug: bool = False,
                     timeout_s=None) -> int:
    code = exit_code(exc)
    if debug:
        traceback.print_exception(exc)
    return report(prog, code, describe(exc, code, timeout_s))


def hard_exit(code: int) -> None:
    """Leave now with `code`, after flushing: no process-group teardown (a barrier or destructor
    with a dead or diverging peer can hang or abort with SIGABRT)."""
    import logging
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    os._exit(code)
