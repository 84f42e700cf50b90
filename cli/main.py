"""The ``wattserve`` command: a thin CLI over the SDK, plus ``serve`` and ``demo``.

Each data command builds a ``wattserve.Client``, calls one method and renders a table
(or stable JSON with ``--json``). Any ``WattserveError`` becomes one line on stderr and
exit code 1. ``serve`` and ``demo`` import Ray lazily, so the base install (SDK + CLI,
no Ray, no torch) can use every other command.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from cli._render import print_json, table
from wattserve import Client, Quality, WattserveError
from wattserve._client import DEFAULT_BASE_URL

app = typer.Typer(
    name="wattserve",
    help="Energy-aware inference scheduler: serve, generate, inspect the energy ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="WATTSERVE_URL", help="Base URL of a wattserve service."),
]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="WATTSERVE_API_KEY", help="Tenant API key.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print stable JSON instead of tables.")]


@contextmanager
def _errors() -> Iterator[None]:
    """Turn a ``WattserveError`` into a one-line message and exit code 1."""
    try:
        yield
    except WattserveError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _require_serve_extra() -> None:
    """``serve`` and ``demo`` run the server side: Ray, torch and diffusers must be here."""
    missing = [m for m in ("ray", "torch", "diffusers", "sqlmodel") if find_spec(m) is None]
    if missing:
        _fail(f"needs the [serve] extra (missing {', '.join(missing)}): "
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
    quality: Annotated[str, typer.Option(help="draft, standard or high.")] = "standard",
    n: Annotated[int, typer.Option("--n", "-n", help="Number of images.")] = 1,
    model: Annotated[str | None, typer.Option(help="Force a variant (default: auto).")] = None,
    out: Annotated[Path | None, typer.Option(help="Directory to save PNGs in.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Generate images and print their energy receipts."""
    if quality not in ("draft", "standard", "high"):
        _fail(f"--quality must be draft, standard or high, got {quality!r}", code=2)
    tier: Quality = quality  # type: ignore[assignment]
    with _errors(), Client(url, api_key) as client:
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
def variants(url: UrlOption = DEFAULT_BASE_URL, json_out: JsonOption = False) -> None:
    """List the variants the service routes to, with quality and energy priors."""
    with _errors(), Client(url) as client:
        found = client.variants()
    if json_out:
        print_json(found)
        return
    table(
        "variants",
        ["variant", "steps", "guidance", "quality", "max px", "J/image prior", "power W"],
        [
            [v.id, v.steps, v.guidance_scale, v.quality_score, v.max_size_px,
             v.joules_per_image_prior, v.power_w]
            for v in found
        ],
    )  # fmt: skip


@app.command()
def ledger(
    url: UrlOption = DEFAULT_BASE_URL,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Newest N rows.")] = 20,
    json_out: JsonOption = False,
) -> None:
    """Show the newest energy-ledger rows (one per output)."""
    with _errors(), Client(url) as client:
        rows = client.ledger(limit)
    if json_out:
        print_json(rows)
        return
    table(
        "ledger (newest first)",
        ["request", "#", "variant", "status", "batch", "joules", "source", "cache", "latency ms"],
        [
            [r.request_id, r.image_index, r.variant, r.status, r.batch_size, r.joules,
             r.energy_source, r.cache, r.latency_ms]
            for r in rows
        ],
    )  # fmt: skip


@app.command()
def status(url: UrlOption = DEFAULT_BASE_URL, json_out: JsonOption = False) -> None:
    """Live power per device and node, from the telemetry agents."""
    with _errors(), Client(url) as client:
        found = client.status()
    if json_out:
        print_json(found)
        return
    table(
        f"cluster power {found.cluster_power_w:,.1f} W"
        + (f" (cap {found.power_cap_w:,.0f} W)" if found.power_cap_w is not None else ""),
        ["node", "device", "name", "source", "power W", "avg W (window)", "energy J", "limit W"],
        [
            [d.node_id[:12], d.index, d.name, d.source, d.power_w or 0.0,
             d.power_w_window or 0.0, d.energy_j or 0.0, d.power_limit_w or 0.0]
            for d in found.devices
        ],
    )  # fmt: skip


@app.command()
def report(url: UrlOption = DEFAULT_BASE_URL, json_out: JsonOption = False) -> None:
    """Energy books: reconciliation against the devices and per-variant joules per output."""
    with _errors(), Client(url) as client:
        found = client.report()
    if json_out:
        print_json(found)
        return
    rec = found.reconciliation
    table(
        "reconciliation (since the telemetry agents started)",
        ["device J", "attributed J", "idle J", "unattributed J", "pending J", "error %"],
        [[rec.device_j, rec.attributed_j, rec.idle_j, rec.unattributed_j, rec.pending_j,
          rec.error_pct]],
    )  # fmt: skip
    table(
        "per variant (ledger)",
        ["variant", "requests", "outputs", "failed", "joules", "J/output", "source"],
        [
            [v.variant, v.requests, v.outputs, v.failed_outputs, v.joules,
             v.joules_per_output or 0.0, v.energy_source]
            for v in found.variants
        ],
    )  # fmt: skip


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    home: Annotated[Path | None, typer.Option(help="State dir (WATTSERVE_HOME).")] = None,
) -> None:
    """Start local Ray + Serve with the catalog and block until Ctrl-C or SIGTERM."""
    _require_serve_extra()
    from cluster.runtime import LocalService
    from cluster.settings import Settings
    from telemetry.logs import configure_logging

    configure_logging(json=False)
    service = LocalService(Settings.from_env(home), host=host, port=port)

    def _terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        with _errors():
            url = service.start()
        typer.echo(f"wattserve serving at {url}  (state: {service.settings.home}; Ctrl-C stops)")
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
    from cli.demo import run_demo
    from cluster.settings import Settings
    from telemetry.logs import configure_logging

    configure_logging(json=False)
    with _errors():
        run_demo(
            Settings.from_env(home), out_dir, requests=requests, concurrency=concurrency, seed=seed
        )


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
