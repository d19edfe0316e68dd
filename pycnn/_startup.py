"""Ctrl-C while the ``pycnn`` command starts: in the command's own process (and only there),
SIGINT while its modules are still importing ends it with one line and status 130 instead of
a traceback; ``pycnn.training.cli.main`` gives SIGINT back to Python's handler as soon as it
starts.  Imported first by ``pycnn/__init__.py``; the standard library only.
"""
import os
import signal
import sys
import threading


def _interrupted_while_starting(signum, frame):
    sys.stderr.write("pycnn: interrupted while starting (nothing was written)\n")
    raise SystemExit(130)


def _is_the_pycnn_command() -> bool:
    """This process runs ``pycnn`` (the console script) or ``python -m pycnn``."""
    script = sys.argv[0] if sys.argv else ""
    return os.path.basename(script) == "pycnn" or script.endswith(os.path.join("pycnn", "__main__.py"))


def quiet_startup_interrupt(enable: bool) -> None:
    """While the command starts, Ctrl-C exits quietly (enable=True); then Python's own
    KeyboardInterrupt again (enable=False).  Only SIGINT's default handler is replaced."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if enable and current is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    elif not enable and current is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if _is_the_pycnn_command():
    quiet_startup_interrupt(True)
