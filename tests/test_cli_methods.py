"""`chunkkv methods`: the registry as a table, and the README's copy of it."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from chunkkv_cli import registry
from chunkkv_cli.cli import app
from chunkkv_cli.commands.methods import markdown_table, method_rows


def test_methods_lists_the_registry_and_the_readme_table_is_its_markdown():
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == registry.names()
    assert all(r["description"] and "prefill_select" in r["capabilities"] for r in rows)
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- methods: chunkkv methods --markdown -->\n")[1].split("\n<!-- /methods -->")[0]
    assert table == markdown_table(method_rows()), "README's methods table is stale: paste `chunkkv methods --markdown`"


def test_one_method_prints_its_parameters_and_an_unknown_one_is_refused():
    result = CliRunner().invoke(app, ["methods", "kvzip"])
    assert result.exit_code == 0 and "reach : int, default" in result.stdout and "own_pass" in result.stdout
    bad = CliRunner().invoke(app, ["methods", "nope"])
    assert bad.exit_code != 0
