"""The command line of patch_ae.py, deploy.py and bench.py, built from a Config dataclass: one typed
flag per field in its --help group, a bad value ends as one line and exit code 2, progress lines.
Nothing here knows the method; patch_ae.Config and deploy.DeployConfig declare the flags."""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import field


class UsageError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, no traceback."""


def flag(default, help: str, group: str, **argparse_options):
    """A Config field and its command-line flag: the default (a function is called for each
    Config), the --help text and group title, other argparse options."""
    meta = {"help": help, "group": group, **argparse_options}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends as any bad input does: one line, exit code 2."""

    def error(self, message):
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: each flag's default once, after its text, unless the text already gives it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if ("default" in text or default in (None, False, "", argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {default})"


def add_config_flags(p: argparse.ArgumentParser, config: type, suppress_defaults: bool = False,
                     exclude: tuple = (), group=None) -> None:
    """One typed flag per field of the dataclass `config` but those in `exclude`, in its --help
    group (or all in `group`: bench.py adds Patch AE's flags this way)."""
    groups = {}
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        md, names = dict(f.metadata), ["--" + f.name.replace("_", "-")]
        names += list(md.pop("aliases", ()))
        title = md.pop("group")
        if group is None and title not in groups:
            groups[title] = p.add_argument_group(title)
        target = group or groups[title]
        if not suppress_defaults:
            md["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.type == "bool":  # annotations are strings (from __future__ import annotations)
            target.add_argument(*names, dest=f.name, action="store_true", **md)
            continue
        md.setdefault("type", {"int": int, "float": float}.get(f.type, str))
        target.add_argument(*names, dest=f.name, **md)


def build_parser(config: type, description: str, epilog: str = "",
                 suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """argparse from a Config dataclass. Abbreviated flags are refused (--epoch is not
    --epochs). With suppress_defaults only the flags given appear in the result."""
    p = Parser(usage="%(prog)s [flag ...]", description=description, epilog=epilog,
               formatter_class=HelpFormatter, allow_abbrev=False,
               argument_default=argparse.SUPPRESS if suppress_defaults else None)
    add_config_flags(p, config, suppress_defaults)
    return p


def parse_flags(config: type, argv, description: str, epilog: str = "") -> tuple[dict, set]:
    """-> (every flag's value, the names of the flags given on the command line)."""
    values = vars(build_parser(config, description, epilog).parse_args(argv))
    given = build_parser(config, description, epilog, suppress_defaults=True).parse_args(argv)
    return values, set(vars(given))


def check(checks: list[tuple[bool, str]]) -> None:
    """Raises UsageError with the message of the first check that is False."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


class Progress:
    """Prints 'desc: done/total, rate, ETA' at most every `every` seconds, and once at the end
    unless final=False (when the caller prints its own summary); nothing when desc is empty."""

    def __init__(self, desc: str, total: int, unit: str = "it", every: float = 2.0,
                 final: bool = True):
        self.desc, self.total, self.unit, self.every, self.final = desc, total, unit, every, final
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        due = now - self.last >= self.every or (self.final and self.done >= self.total)
        if self.desc and due:
            self.last, rate = now, self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"  {self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
                  f"ETA {eta:.0f}s", flush=True)
