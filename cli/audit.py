"""``wattserve audit``: the shadow audit's scores and verdicts, and undoing a demotion.

A thin shell over ``AdminClient.audit`` and ``AdminClient.restore_demotion``; both need
the admin token. Scores from a random-weight CLIP (the built-in tiny one) are labeled so.
"""

from __future__ import annotations

from typing import Annotated, cast

import typer

from wattserve._admin import DemotionRestore
from wattserve._admin_client import validated
from wattserve._client import DEFAULT_BASE_URL
from wattserve._schemas import Quality
from wattserve.cli import _render as render
from wattserve.cli._common import (
    HomeOption,
    JsonOption,
    TokenOption,
    UrlOption,
    bad_input,
    errors,
    open_admin,
    parse_when,
)

audit_app = typer.Typer(
    help="Shadow-audit scores per (variant, cause, tier), verdicts and demotions.",
    invoke_without_command=True,
)


@audit_app.callback()
def audit(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="Only audits since: ISO 8601 (UTC unless offset) or 24h.")
    ] = None,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Audited outputs with the mean and 95 % interval of each score, and the verdicts."""
    if ctx.invoked_subcommand is not None:
        return
    start = parse_when(since, "--since")
    with open_admin(url, token, home) as client, errors():
        found = client.audit(since=start)
    render.out(found, json_out, render.audit)


@audit_app.command("restore")
def restore(
    variant: Annotated[str, typer.Argument(help="The demoted variant.", show_default=False)],
    tier: Annotated[str, typer.Argument(help="draft | standard | high.", show_default=False)],
    approximate: Annotated[
        bool,
        typer.Option("--approximate", help="Restore its approximate reuse, not the variant."),
    ] = False,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Undo a demotion: routing uses the pair again and the audit judges it afresh."""
    kind = "approximate" if approximate else "variant"
    with bad_input():
        validated(DemotionRestore, {"variant": variant, "tier": tier, "kind": kind})
    with open_admin(url, token, home) as client, errors():
        found = client.restore_demotion(variant, cast(Quality, tier), kind)
    render.out(found, json_out, lambda d: render.demotions([d], "restored"))
