"""The CLI reference in docs/cli.md is generated from the Typer app and must not drift."""

from pathlib import Path

from typer.cli import app as typer_cli
from typer.testing import CliRunner

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render_reference() -> str:
    """What ``make cli-docs`` writes, produced in memory by the same Typer command."""
    result = CliRunner().invoke(
        typer_cli, ["wattserve.cli.main", "utils", "docs", "--name", "wattserve"]
    )
    assert result.exit_code == 0, result.output
    return result.stdout.removesuffix("\n")  # echo adds one newline to what --output writes


def test_cli_reference_matches_the_app():
    assert render_reference() == REFERENCE.read_text(), "docs/cli.md is stale: run make cli-docs"


def test_cli_reference_does_not_depend_on_the_environment(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("WATTSERVE_URL", "http://elsewhere:1")
    monkeypatch.setenv("WATTSERVE_ADMIN_TOKEN", "adm_never-in-the-docs")
    reference = render_reference()
    assert reference == REFERENCE.read_text(), "docs/cli.md is stale: run make cli-docs"
    assert "adm_never-in-the-docs" not in reference
