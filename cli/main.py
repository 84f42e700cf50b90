"""The ``wattserve`` command: a thin CLI over the SDK, plus ``serve`` and ``demo``.

Each data command builds a ``wattserve.Client`` (or ``AdminClient``), calls one method
and renders a table (or stable JSON with ``--json``). Wrong input exits 2 before
anything is sent; any ``WattserveError`` becomes one line on stderr and exit code 1.
``serve`` and ``demo`` import Ray lazily, so the base install (SDK + CLI, no Ray, no
torch) can use every other command. The admin sub-commands live in ``cli/admin.py``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, cast

import typer

from wattserve import Quality
from wattserve._admin_client import (
    ADMIN_TOKEN_ENV,
    LEDGER_STATUSES,
    MAX_LEDGER_LIMIT,
    admin_token_path,
    ledger_params,
    report_params,
)
from wattserve._client import DEFAULT_BASE_URL
from wattserve._schemas import LedgerStatus
from wattserve.cli import _render as render
from wattserve.cli._common import (
    ApiKeyOption,
    HomeOption,
    JsonOption,
    TokenOption,
    UrlOption,
    admin_token_if_any,
    bad_input,
    errors,
    fail,
    open_admin,
    open_client,
    parse_when,
)
from wattserve.cli._render import print_json, table
from wattserve.cli.admin import budget_app, policy_app, tenant_app, variants_app
from wattserve.cli.audit import audit_app
from wattserve.cli.bench import bench
from wattserve.cli.simulate import simulate
from wattserve.cli.trace import trace_app

app = typer.Typer(
    name="wattserve",
    help="Energy-aware inference scheduler: serve, generate, inspect the energy ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(variants_app, name="variants")
app.add_typer(budget_app, name="budget")
app.add_typer(policy_app, name="policy")
app.add_typer(tenant_app, name="tenant")
app.add_typer(trace_app, name="trace")
app.add_typer(audit_app, name="audit")
app.command()(simulate)
app.command()(bench)

PUBLIC_LEDGER_LIMIT = 1000  # GET /v1/ledger's own bound
FORMATS = ("table", "json", "csv")


def _require_serve_extra() -> None:
    """``serve`` and ``demo`` run the server side: Ray, torch and diffusers must be here."""
    missing = [m for m in ("ray", "torch", "diffusers", "sqlmodel") if find_spec(m) is None]
    if missing:
        fail(f"needs the [serve] extra (missing {', '.join(missing)}): "
             "pip install 'wattserve[serve]'")  # fmt: skip


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    url: UrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
    seed: Annotated[
        int | None, typer.Option(help="Fixes the pixels; omit for a new image.")
    ] = None,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT in pixels.")] = "64x64",
    quality: Annotated[
        str | None, typer.Option(help="draft, standard or high (default: the service policy's).")
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Number of images.")] = 1,
    model: Annotated[str | None, typer.Option(help="Force a variant (default: auto).")] = None,
    out: Annotated[Path | None, typer.Option(help="Directory to save PNGs in.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Generate images and print their energy receipts."""
    if quality not in (None, "draft", "standard", "high"):
        fail(f"--quality must be draft, standard or high, got {quality!r}", code=2)
    tier: Quality | None = quality  # type: ignore[assignment]
    with open_client(url, api_key) as client, errors():
        result = client.generate(prompt, n=n, size=size, seed=seed, quality=tier, model=model)
    images = []
    for image in result.images:
        path = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{result.request_id}-{image.receipt.image_index}.png"
            path.write_bytes(image.png_bytes)
        images.append(
            {
                "path": str(path) if path else None,
                "sha256": hashlib.sha256(image.png_bytes).hexdigest(),
                "receipt": image.receipt,
            }
        )
    if json_out:
        print_json({"request_id": result.request_id, "images": images})
        return
    table(
        f"request {result.request_id}",
        ["#", "variant", "seed", "batch", "joules", "source", "cache", "latency ms", "saved to"],
        [
            [r.image_index, r.variant, r.seed, r.batch_size, r.joules, r.energy_source,
             r.cache, r.latency_ms, img["path"] or "-"]
            for img in images
            for r in [img["receipt"]]
        ],
    )  # fmt: skip


@app.command()
def ledger(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's rows (admin).")] = None,
    variant: Annotated[str | None, typer.Option(help="Only this variant's rows (admin).")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Rows from this time on (admin): ISO 8601 (UTC unless offset) or 24h, 7d, 30m."
        ),
    ] = None,
    status: Annotated[str | None, typer.Option(help="ok or failed (admin).")] = None,
    limit: Annotated[int, typer.Option(help=f"Newest N rows (1..{MAX_LEDGER_LIMIT}).")] = 20,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    url: UrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Energy-ledger rows, one per output, newest first.

    With an admin token (and no --api-key): every tenant's rows, with the filters.

    Otherwise the calling tenant's own rows (--api-key); only --limit applies.
    """
    output_format = _output_format(output_format, json_out)
    if status is not None and status not in LEDGER_STATUSES:
        fail(f"--status: want ok or failed; got {status!r}", code=2)
    moment = parse_when(since, "--since")
    with bad_input():
        ledger_params(tenant=tenant, variant=variant, since=moment, limit=limit)
    admin_token = admin_token_if_any(api_key, token, home)
    if admin_token is not None:
        with open_admin(url, admin_token, home) as admin, errors():
            checked = cast(LedgerStatus | None, status)  # checked against LEDGER_STATUSES
            rows = admin.ledger(
                tenant=tenant, variant=variant, status=checked, since=moment, limit=limit
            )
    else:
        _check_tenant_ledger(home, limit, tenant=tenant, variant=variant, since=since,
                             status=status)  # fmt: skip
        with open_client(url, api_key) as client, errors():
            rows = client.ledger(limit)
    if output_format == "csv":
        render.print_csv(rows)
    else:
        render.out(rows, output_format == "json", render.ledger)


def _output_format(output_format: str, json_out: bool) -> str:
    """``--format`` reconciled with ``--json``; exits 2 on an unknown or clashing value."""
    if output_format not in FORMATS:
        fail(f"--format: want {', '.join(FORMATS)}; got {output_format!r}", code=2)
    if json_out and output_format == "csv":
        fail("--json and --format csv contradict each other: give one", code=2)
    return "json" if json_out else output_format


def _check_tenant_ledger(home: Path | None, limit: int, **filters: str | None) -> None:
    """A tenant's own ledger (``/v1/ledger``) takes only ``--limit``, up to its bound."""
    given = [f"--{name}" for name, value in filters.items() if value is not None]
    if given:
        fail(
            f"{', '.join(given)}: filters need the admin view (--token, or the admin token "
            f"in {admin_token_path(home)}); a tenant's own ledger takes only --limit",
            code=2,
        )
    if limit > PUBLIC_LEDGER_LIMIT:
        fail(f"--limit: a tenant's own ledger returns at most {PUBLIC_LEDGER_LIMIT} rows", 2)


@app.command()
def status(url: UrlOption = DEFAULT_BASE_URL, json_out: JsonOption = False) -> None:
    """Live power per device and node, and the budget in force with when it last changed."""
    with open_client(url) as client, errors():
        found = client.status()
    render.out(found, json_out, render.status)


@app.command()
def report(
    since: Annotated[
        str | None, typer.Option(help="Window start: ISO 8601 (UTC unless offset) or 24h, 7d.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Window end, same forms (default: now).")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's outputs.")] = None,
    books: Annotated[
        bool, typer.Option("--books", help="The energy books (reconciliation) instead.")
    ] = False,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Joules per variant and tenant, J/output vs target, savings by cause, over a window.

    Needs an admin token; without one, or with --books, it shows the energy books instead.
    """
    window = {"since": parse_when(since, "--since"), "until": parse_when(until, "--until"),
              "tenant": tenant}  # fmt: skip
    with bad_input():
        report_params(**window)
    asked = [f"--{k}" for k, v in window.items() if v is not None]
    admin_token = None if books else admin_token_if_any(None, token, home)
    if admin_token is None:
        if asked:
            why = "--books shows" if books else "without an admin token, report shows"
            fail(f"{', '.join(asked)}: {why} the energy books, which have no window", code=2)
        with open_client(url) as client, errors():
            found = client.report()
        render.out(found, json_out, render.books)
        return
    with open_admin(url, admin_token, home) as admin, errors():
        window_report = admin.report(**window)
    render.out(window_report, json_out, render.window_report)


@app.command()
def profile(
    out: Annotated[Path, typer.Option(help="Where to write it (JSON).")] = Path("profile.json"),
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
) -> None:
    """Export what the service learned, for `wattserve simulate --profile` (admin).

    Per variant and batch size: J/output (EWMA and mean) and round trips (EWMA, median,
    the recent ones); and the time a request spends outside any batch. One replica's.
    """
    if not out.parent.is_dir():
        fail(f"--out: no directory {out.parent} to write the profile in", code=2)
    with open_admin(url, token, home) as admin, errors():
        learned = admin.profiles()
    out.write_text(learned.model_dump_json(indent=2) + "\n", encoding="utf-8")
    typer.echo(
        f"wrote {out}: {len(learned.data)} (variant, batch size) points from replica "
        f"{learned.replica}; energy sources {', '.join(learned.energy_sources) or 'none'}"
    )


@app.command()
def usage(
    url: UrlOption = DEFAULT_BASE_URL, api_key: ApiKeyOption = None, json_out: JsonOption = False
) -> None:
    """A tenant's limits and the energy it used against its quotas (needs --api-key)."""
    if not api_key:
        fail("usage is per tenant: give --api-key (or set WATTSERVE_API_KEY)", code=2)
    with open_client(url, api_key) as client, errors():
        found = client.usage()
    render.out(found, json_out, render.tenant)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    home: Annotated[Path | None, typer.Option(help="State dir (WATTSERVE_HOME).")] = None,
    address: Annotated[
        str | None,
        typer.Option(
            envvar="WATTSERVE_RAY_ADDRESS",
            help="Attach to this running Ray cluster ('auto' as Ray means it) instead of "
            "starting a local one; on exit remove only what this run deployed.",
        ),
    ] = None,
) -> None:
    """Serve the catalog on local Ray (or a cluster with --address) until Ctrl-C or SIGTERM."""
    _require_serve_extra()
    from wattserve.cluster.runtime import LocalService
    from wattserve.cluster.settings import Settings
    from wattserve.telemetry.logs import configure_logging

    configure_logging(json=False)
    service = LocalService(Settings.from_env(home), host=host, port=port, address=address)

    def _terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        with errors():
            url = service.start()
        typer.echo(f"wattserve serving at {url}  (state: {service.settings.home}; Ctrl-C stops)")
        where = (f"${ADMIN_TOKEN_ENV}" if os.environ.get(ADMIN_TOKEN_ENV)
                 else admin_token_path(service.settings.home))  # fmt: skip
        typer.echo(f"admin token: in {where} (the admin commands read it from there)")
        sys.stdout.flush()
        signal.pause()
    except KeyboardInterrupt:
        typer.echo("stopping wattserve...")
    finally:
        service.stop()


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where to write the report.")] = Path("."),
    requests: Annotated[int, typer.Option(min=6, max=500, help="Requests to send.")] = 36,
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 6,
    home: Annotated[Path | None, typer.Option(help="State dir (WATTSERVE_HOME).")] = None,
    seed: Annotated[int | None, typer.Option(help="Workload seed (default: random).")] = None,
) -> None:
    """Start a local service, replay a small mixed workload, report energy per variant."""
    _require_serve_extra()
    from wattserve.cli.demo import run_demo
    from wattserve.cluster.settings import Settings
    from wattserve.telemetry.logs import configure_logging

    configure_logging(json=False)
    with errors():
        run_demo(
            Settings.from_env(home), out_dir, requests=requests, concurrency=concurrency, seed=seed
        )


def main() -> None:
    """Console-script entry point; the last guard against a traceback reaching a user."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except Exception as exc:  # a bug in wattserve: say so in one line, keep it reportable
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (please report this)",
                   err=True)  # fmt: skip
        sys.exit(1)
