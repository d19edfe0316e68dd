"""The command line's common parts: a parser whose usage errors are one line (exit 2), the
flag types, the flags of every Config setting, and the one-line failure of a command."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from pycnn.training.config import Config

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the flag and what it expected), exit 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


def fail(command: str, message, status: int = EXIT_BAD_INPUT) -> int:
    print(f"pycnn {command}: {message}", file=sys.stderr)
    return status


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_int_list(text: str) -> tuple:
    if text.strip() == "":
        return ()
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,128, got {text!r}") from None


def parse_size(text: str):
    return "auto" if text == "auto" else parse_int(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(Config):
        if field.name == "fold":
            continue  # set by the k-fold driver
        if field.name in ("val_size", "warmup_steps"):
            kind, metavar = parse_size, "auto|N"
        elif isinstance(field.default, bool):
            kind, metavar = parse_bool, "true|false"
        elif isinstance(field.default, tuple):
            kind, metavar = parse_int_list, "N,N,..."
        elif field.name in Config.INTEGERS:
            kind, metavar = parse_int, "N"
        elif field.name in Config.NUMBERS:
            kind, metavar = parse_number, "X"
        else:
            kind, metavar = str, field.name.upper()
        choices = Config.CHOICES.get(field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind, default=None,
                            choices=choices, metavar=None if choices else metavar,
                            help=f"{Config.HELP[field.name]} (default: {shown(field.default)})")


def shown(default) -> str:
    """A default as it is typed on the command line: 16,32 for a tuple, true/false, all for ()."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default) if default else "all"
    return str(default)
