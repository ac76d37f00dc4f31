"""The README stays true: its config table is the code's, its commands exist."""

import re

from preftune.cli import build_parser, config_markdown

from .conftest import REPO


def test_readme_config_reference_matches_code():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", readme, re.S)
    assert table, "README lost its config-reference markers"
    assert table.group(1) == config_markdown(), (
        "README config table is stale: regenerate it from `preftune config --markdown`")


def test_readme_commands_are_real_subcommands():
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S))
    used = set(re.findall(r"(?:^|&& )preftune (\w[\w-]*)", blocks, re.M))
    choices = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert used and used <= choices, used - choices
