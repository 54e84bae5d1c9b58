"""Every option of the suite's `pytest --help` groups is exercised by a test: its name appears in a test's command
line (or in the options it parses) under tests/. An option no test names is a claim nothing checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blip_triton_bench.options import add_options

pytestmark = pytest.mark.unit

TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class RecordedGroup:
    options: list[str] = field(default_factory=list)

    def addoption(self, *names: str, **_settings: object) -> None:
        self.options.extend(name for name in names if name.startswith("--"))


@dataclass
class RecordingParser:
    """Stands in for pytest.Parser: add_options only asks it for groups and adds options to them."""

    groups: dict[str, RecordedGroup] = field(default_factory=dict)

    def getgroup(self, name: str, description: str = "") -> RecordedGroup:
        return self.groups.setdefault(name, RecordedGroup())

    def addini(self, *_args: object, **_settings: object) -> None:
        pass


def suite_options() -> list[str]:
    parser = RecordingParser()
    add_options(parser)
    return sorted({option for group in parser.groups.values() for option in group.options})


def test_the_recorded_options_are_the_ones_pytest_lists() -> None:
    options = suite_options()
    assert len(options) > 40, options  # every group of the plugin, not one
    for option in ("--model", "--variant", "--disconnect-stress", "--require-baselines", "--reference-triton-image"):
        assert option in options


def test_every_suite_option_appears_on_a_command_line_in_a_test() -> None:
    texts = [path.read_text() for path in TESTS_DIR.rglob("*.py") if path.resolve() != Path(__file__).resolve()]
    unexercised = [
        option
        for option in suite_options()
        if not any(re.search(rf"""["'\s]{re.escape(option)}(?![\w-])""", text) for text in texts)
    ]
    assert unexercised == [], f"no test under tests/ passes these options: {', '.join(unexercised)}"
