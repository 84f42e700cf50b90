"""What every ``wattserve`` command shares: options, error handling, input parsing.

Two exit codes for two kinds of failure: 2 when the input is wrong and nothing was
sent (a bad flag, a negative wattage, an unreadable file), 1 when the service (or the
way to it) said no. Both are one line on stderr starting ``error:``; never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn, get_args

import httpx
import typer

from wattserve import Client, InvalidRequest, Quality, WattserveError
from wattserve._admin_client import AdminClient, default_admin_token

# The transport every client the CLI opens uses; None is the network. Tests put an
# ``httpx.MockTransport`` here, the seam the SDK itself offers.
transport: httpx.BaseTransport | None = None

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="WATTSERVE_URL", help="Base URL of a wattserve service."),
]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="WATTSERVE_API_KEY", help="Tenant API key.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print stable JSON instead of tables.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="WATTSERVE_ADMIN_TOKEN",
        help="Admin token (default: the admin-token file in the state dir).",
        show_envvar=True,
    ),
]
HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="State dir holding admin-token ($WATTSERVE_HOME, ~/.wattserve)."),
]

QUALITIES: tuple[Quality, ...] = get_args(Quality)
_RELATIVE_RE = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# How an SDK field is spelled on the command line, where it is not ``--kebab-case``.
_OPTION_OF = {"qualities": "--quality", "name": "NAME", "toml": "FILE"}


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def option_name(param: str) -> str:
    """How an SDK field is spelled on the command line: ``daily_kj`` → ``--daily-kj``."""
    return _OPTION_OF.get(param, "--" + param.replace("_", "-"))


@contextmanager
def errors() -> Iterator[None]:
    """Turn a ``WattserveError`` into a one-line message and exit code 1."""
    try:
        yield
    except WattserveError as exc:
        fail(exc.message)


@contextmanager
def bad_input() -> Iterator[None]:
    """Turn input the SDK refuses before sending (``InvalidRequest``) into exit code 2.

    Wraps only the SDK's pure body builders, which never do I/O, so an error here
    always means nothing was sent. The field is renamed to the option that set it.
    """
    try:
        yield
    except InvalidRequest as exc:
        message = exc.message
        if exc.param and message.startswith(f"{exc.param}:"):
            message = option_name(exc.param) + message[len(exc.param) :]
        fail(message, code=2)


def pick(value: object, clear: bool, option: str, flag: str) -> dict[str, object]:
    """``{}`` (unchanged), ``{field: value}`` or ``{field: None}`` (cleared) for an update.

    ``option`` is the ``--kebab-case`` name whose field is set; ``flag`` clears it.
    Giving both is contradictory and exits 2.
    """
    field = option.removeprefix("--").replace("-", "_")
    if clear and value is not None:
        fail(f"{option} and {flag} contradict each other: give one", code=2)
    if clear:
        return {field: None}
    return {} if value is None else {field: value}


def parse_when(text: str | None, option: str, now: datetime | None = None) -> datetime | None:
    """``--since``/``--until``: ISO 8601 (UTC unless it has an offset) or ``24h``/``7d``/``30m``.

    A relative amount counts back from ``now`` (the current time by default).
    """
    if text is None:
        return None
    value = text.strip()
    relative = _RELATIVE_RE.match(value)
    if relative:
        now = now or datetime.now(UTC)
        try:
            return now - timedelta(seconds=int(relative.group(1)) * _UNIT_S[relative.group(2)])
        except OverflowError:
            fail(f"{option}: {text!r} reaches back before year 1", code=2)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(
            f"{option}: want an ISO 8601 time (2026-05-01T12:00Z) or an age like 30m, 24h, "
            f"7d; got {text!r}",
            code=2,
        )
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_qualities(text: str | None) -> list[Quality] | None:
    """``--quality draft,standard`` → ``["draft", "standard"]``; exits 2 on a bad list."""
    if text is None:
        return None
    tiers = [part.strip() for part in text.split(",")]
    if not text.strip() or "" in tiers:
        fail(f"--quality: want tiers separated by commas (e.g. draft,standard); got {text!r}", 2)
    for tier in tiers:
        if tier not in QUALITIES:
            fail(f"--quality: unknown tier {tier!r} (known: {', '.join(QUALITIES)})", code=2)
    if len(set(tiers)) != len(tiers):
        fail(f"--quality: a tier is listed twice in {text!r}", code=2)
    return tiers  # type: ignore[return-value]


def open_client(url: str, api_key: str | None = None) -> Client:
    """The public SDK client the CLI talks through."""
    return Client(url, api_key, transport=transport)


def open_admin(url: str, token: str | None, home: Path | None) -> AdminClient:
    """The admin SDK client; exits 1 saying where it looked when there is no token."""
    with errors():
        return AdminClient(url, token, home=home, transport=transport)


def admin_token_if_any(api_key: str | None, token: str | None, home: Path | None) -> str | None:
    """The admin token when a command should show its admin view, else None.

    Commands with both views (``ledger``, ``report``, ``variants list``) use the admin
    API whenever a token is available, unless ``--api-key`` asks for the tenant's view.
    """
    if api_key:
        return None
    if token:
        return token
    with errors():
        return default_admin_token(home)
