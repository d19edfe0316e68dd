"""What the command-line tests share: a tiny training setting, running ``cli.main`` as the
console script would (exit status, stdout, stderr), and the one-line error check."""
from __future__ import annotations

from pycnn.training import cli

TINY = ["--epochs", "1", "--widths", "4,8", "--limit", "200", "--checks", "off"]


def call(argv, capsys) -> tuple[int, str, str]:
    """cli.main's exit status (argparse's SystemExit included), stdout and stderr."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    """The one line of an error message (and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
