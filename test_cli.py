"""Tests of patch_ae.py's command line (its supporting section "The command line"), which
patch_ae.py, deploy.py and bench.py build from their Config dataclasses: typed flags in --help
groups, the flags given, one-line errors, progress lines. Run: pytest -q"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

import patch_ae as pa


def first_seeds() -> list:
    return [0]


@dataclass
class Toy:
    size: int = pa.flag(3, "a size", "numbers")
    rate: float = pa.flag(0.5, "a rate (default 0.5, the usual)", "numbers")
    name: str = pa.flag("a", "a name", "words", choices=("a", "b"))
    loud: bool = pa.flag(False, "say more", "words")
    seeds: list = pa.flag(first_seeds, "seeds", "numbers", nargs="+", type=int,
                           aliases=("--many",))


def test_flags_come_typed_from_the_dataclass_and_the_given_ones_are_known():
    values, given = pa.parse_flags(Toy, ["--size", "4", "--many", "1", "2", "--loud"], "toy")
    assert values == {"size": 4, "rate": 0.5, "name": "a", "loud": True, "seeds": [1, 2]}
    assert given == {"size", "seeds", "loud"}
    assert pa.parse_flags(Toy, [], "toy") == ({"size": 3, "rate": 0.5, "name": "a",
                                                "loud": False, "seeds": [0]}, set())
    assert Toy().seeds == [0] and Toy().seeds is not Toy().seeds  # a new list for each Config


@pytest.mark.parametrize("argv,message", [
    (["--siz", "4"], "unrecognized arguments: --siz"),  # no abbreviations
    (["--size", "x"], "invalid int value: 'x'"),
    (["--rate", "fast"], "invalid float value: 'fast'"),
    (["--name", "c"], "invalid choice: 'c'"),
    (["--seeds"], "expected at least one argument")])
def test_a_bad_command_line_is_a_usage_error(argv, message):
    with pytest.raises(pa.UsageError, match=re.escape(message)):
        pa.parse_flags(Toy, argv, "toy")


def test_help_lists_each_flag_in_its_group_with_its_default_once():
    text = pa.build_parser(Toy, "a toy", "examples:\n  toy --size 4").format_help()
    numbers, words = text.index("\nnumbers:\n"), text.index("\nwords:\n")
    assert numbers < text.index("--size") < text.index("--rate") < words < text.index("--name")
    assert "a size (default: 3)" in text
    assert "a rate (default 0.5, the usual)" in text and "(default: 0.5)" not in text
    assert "say more\n" in text and "say more (default" not in text  # False: nothing to say
    assert "--seeds SEEDS [SEEDS ...], --many SEEDS [SEEDS ...]" in text
    assert text.rstrip().endswith("examples:\n  toy --size 4")


def test_add_config_flags_leaves_out_the_excluded_and_can_put_all_in_one_group():
    p = pa.Parser(allow_abbrev=False)
    group = p.add_argument_group("toy's flags")
    pa.add_config_flags(p, Toy, exclude=("seeds", "loud"), group=group)
    text = p.format_help()
    assert "--size" in text and "--seeds" not in text and "--loud" not in text
    assert "\nnumbers:\n" not in text and "\ntoy's flags:\n" in text
    assert vars(p.parse_args(["--name", "b"])) == {"size": 3, "rate": 0.5, "name": "b"}


def test_check_raises_the_first_failing_message():
    pa.check([(True, "fine")])
    with pytest.raises(pa.UsageError, match="^second$"):
        pa.check([(True, "first"), (False, "second"), (False, "third")])


def test_progress_prints_done_rate_and_eta_every_few_seconds_and_at_the_end(capsys,
                                                                            monkeypatch):
    now = iter([0.0, 1.0, 2.5, 3.0])
    monkeypatch.setattr(pa.time, "perf_counter", lambda: next(now))
    progress = pa.Progress("reading", 3, "img", every=2.0)
    for _ in range(3):
        progress.update()
    assert capsys.readouterr().out.splitlines() == [
        "  reading: 2/3 img, 0.8 img/s, ETA 1s",  # at 2.5 s: 2 s since the last line
        "  reading: 3/3 img, 1.0 img/s, ETA 0s"]  # the end
    now = iter([0.0, 1.0])
    pa.Progress("epoch 1", 1, final=False).update()  # the caller prints its own summary
    now = iter([0.0, 5.0])
    pa.Progress("", 1, every=0).update()             # no description: silent
    assert capsys.readouterr().out == ""
