"""Server-side settings, read from the environment once, with embedded defaults.

=====================  =====================================  ==========================
variable               meaning                                default
=====================  =====================================  ==========================
WATTSERVE_HOME         state directory                        ``~/.wattserve``
WATTSERVE_DB_URL       SQLAlchemy URL of the ledger database  ``sqlite:///$HOME/wattserve.db``
WATTSERVE_CATALOG      variant catalog file (TOML)            the built-in catalog
RAY_TMPDIR             Ray's session/temp files               ``$WATTSERVE_HOME/ray``
WATTSERVE_POWER_SOURCE auto | nvml | simulated                ``auto``
WATTSERVE_SAMPLE_HZ    telemetry samples per second/device    ``10``
WATTSERVE_SIM_DEVICES  simulated GPUs per node (no NVML)      ``4``
WATTSERVE_CACHE_DIR    result cache directory                 ``$WATTSERVE_HOME/cache``
WATTSERVE_CACHE_MAX_BYTES  result cache size cap (LRU)        ``1073741824`` (1 GiB)
WATTSERVE_CACHE_TTL_S  result cache entry lifetime            none (no expiry)
WATTSERVE_POWER_CAP_W  cluster power budget in watts (seed)   none (uncapped)
WATTSERVE_JOULES_PER_OUTPUT_TARGET  J/output target (seed)     none
WATTSERVE_SCHEDULER_REPLICAS  scheduler (ingress) replicas    ``1``
WATTSERVE_POWER_HOLD_S  how long a request waits for power   ``5``
                       under the cap before its 429
WATTSERVE_AUDIT_CLIP_MODEL  local CLIP model for the shadow    none (no CLIP scores)
                       audit's text-image scores (a path, or
                       ``builtin:tiny-clip``: random weights)
WATTSERVE_ADMIN_TOKEN  admin API token                        generated into the state dir
=====================  =====================================  ==========================

The catalog file, the power cap, the J/output target and the cache limits *seed* the
control plane's database on first start; after that the database is authoritative and
``wattserve budget|policy|variants`` change it live (a restart does not undo a change).

The admin token is ``WATTSERVE_ADMIN_TOKEN`` if set, else ``$WATTSERVE_HOME/admin-token``,
created with mode 0600 on first start; the CLI reads it from the same place.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from wattserve import WattserveError
from wattserve._admin import ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE

DEFAULT_HOME = "~/.wattserve"


@dataclass(frozen=True)
class Settings:
    """Where state lives and what to serve."""

    home: Path
    db_url: str
    catalog_path: Path | None
    ray_tmpdir: Path
    power_source: str = "auto"
    sample_hz: float = 10.0
    sim_devices: int = 4
    cache_dir: Path | None = None  # None: $WATTSERVE_HOME/cache
    cache_max_bytes: int = 1 << 30
    cache_ttl_s: float | None = None
    power_cap_w: float | None = None
    joules_per_output_target: float | None = None
    scheduler_replicas: int = 1
    power_hold_s: float = 5.0
    audit_clip_model: str | None = None  # None: the audit scores pixels only

    @property
    def coalescers(self) -> int:
        """Coalescer actors to start: none for one scheduler replica (it coalesces itself)."""
        return 0 if self.scheduler_replicas <= 1 else 2

    @property
    def result_cache_dir(self) -> Path:
        """Where cached outputs are stored."""
        return self.cache_dir or self.home / "cache"

    @property
    def models_dir(self) -> Path:
        """Where built-in pipelines are saved and loaded from."""
        return self.home / "models"

    @classmethod
    def from_env(cls, home: Path | str | None = None) -> Settings:
        """Settings from the environment; ``home`` overrides ``WATTSERVE_HOME``."""
        root = Path(home or os.environ.get("WATTSERVE_HOME") or DEFAULT_HOME).expanduser()
        root = root.resolve()
        catalog = os.environ.get("WATTSERVE_CATALOG")
        cache_dir = os.environ.get("WATTSERVE_CACHE_DIR")
        ttl = os.environ.get("WATTSERVE_CACHE_TTL_S")
        cap = os.environ.get("WATTSERVE_POWER_CAP_W")
        target = os.environ.get("WATTSERVE_JOULES_PER_OUTPUT_TARGET")
        return cls(
            home=root,
            db_url=os.environ.get("WATTSERVE_DB_URL") or f"sqlite:///{root / 'wattserve.db'}",
            catalog_path=Path(catalog).expanduser() if catalog else None,
            ray_tmpdir=Path(os.environ.get("RAY_TMPDIR") or root / "ray"),
            power_source=os.environ.get("WATTSERVE_POWER_SOURCE") or "auto",
            sample_hz=float(os.environ.get("WATTSERVE_SAMPLE_HZ") or 10.0),
            sim_devices=int(os.environ.get("WATTSERVE_SIM_DEVICES") or 4),
            cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
            cache_max_bytes=int(os.environ.get("WATTSERVE_CACHE_MAX_BYTES") or 1 << 30),
            cache_ttl_s=float(ttl) if ttl else None,
            power_cap_w=float(cap) if cap else None,
            joules_per_output_target=float(target) if target else None,
            scheduler_replicas=int(os.environ.get("WATTSERVE_SCHEDULER_REPLICAS") or 1),
            power_hold_s=float(os.environ.get("WATTSERVE_POWER_HOLD_S") or 5.0),
            audit_clip_model=os.environ.get("WATTSERVE_AUDIT_CLIP_MODEL") or None,
        )


class AdminTokenError(WattserveError):
    """The admin token file exists but is unsafe or unreadable."""


def ensure_admin_token(home: Path) -> str:
    """The admin token: from the environment, else the state dir's file (made if absent)."""
    from_env = os.environ.get(ADMIN_TOKEN_ENV)
    if from_env:
        return from_env
    path = home / ADMIN_TOKEN_FILE
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise AdminTokenError(
                f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            ) from None
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise AdminTokenError(f"{path} is empty; delete it to generate a new token") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token
