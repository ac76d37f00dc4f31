"""docs/evaluation.md stays true: its commands are real subcommands and every config key it names exists."""

import dataclasses
import re

from preftune import config
from preftune.cli import build_parser

from .conftest import REPO

DOC = (REPO / "docs" / "evaluation.md").read_text()


def test_documented_commands_are_real_subcommands():
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", DOC, re.S))
    used = set(re.findall(r"(?:^|&& )preftune (\w[\w-]*)", blocks, re.M))
    choices = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert {"eval", "generate", "report"} <= used <= choices, used - choices


def test_documented_config_keys_exist():
    sections = {f.name: {g.name for g in dataclasses.fields(f.default_factory())}  # type: ignore[misc]
                for f in dataclasses.fields(config.Config)}
    named = set(re.findall(r"`((?:eval|judge|log|train|data)\.[a-z_]+)", DOC))
    assert named, "no config keys found in docs/evaluation.md"
    missing = sorted(k for k in named if k.split(".")[1] not in sections.get(k.split(".")[0], set()))
    assert not missing, missing


def test_documented_generate_options_exist():
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]  # noqa: SLF001
    options = {o for a in generate._actions for o in a.option_strings}  # noqa: SLF001
    documented = set(re.findall(r"(--[a-z][a-z-]+)", DOC.split("### `preftune generate`")[1].split("###")[0]))
    assert documented <= options, documented - options


def test_config_reference_rows_stay_one_line_each():
    from preftune.cli import config_markdown

    rows = config_markdown().splitlines()[2:]  # after the header and its rule
    assert all(r.startswith("| ") and r.endswith(" |") for r in rows)
    assert any(r.startswith("| `train.eval_every` |") for r in rows)  # a docstring wrapped over two lines
