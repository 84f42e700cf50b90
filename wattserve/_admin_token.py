"""Where the admin token lives: ``$WATTSERVE_HOME/admin-token`` (``~/.wattserve`` by default).

``WATTSERVE_ADMIN_TOKEN`` overrides the file. Both sides (the SDK and CLI here, the server
in ``cluster.settings``) take the file name and the variable from ``wattserve._admin``
(``ADMIN_TOKEN_FILE``, ``ADMIN_TOKEN_ENV``), so they agree on where the token is.
"""

from __future__ import annotations

import os
from pathlib import Path

from wattserve._admin import ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE
from wattserve._exceptions import WattserveError

HOME_ENV = "WATTSERVE_HOME"
DEFAULT_HOME = "~/.wattserve"


def state_home(home: Path | str | None = None) -> Path:
    """The state directory: ``home``, else ``$WATTSERVE_HOME``, else ``~/.wattserve``."""
    return Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def admin_token_path(home: Path | str | None = None) -> Path:
    """Where ``wattserve serve`` keeps the admin token (the path only, never the token)."""
    return state_home(home) / ADMIN_TOKEN_FILE


def default_admin_token(home: Path | None = None) -> str | None:
    """The admin token: ``$WATTSERVE_ADMIN_TOKEN``, else the state dir's ``admin-token``.

    The same order and reading as the server's (``cluster.settings.ensure_admin_token``):
    a non-empty variable is used as it is, the file's content is stripped. Returns None
    when neither holds one (no variable, no file, or an empty one). A file that exists
    but cannot be read raises ``WattserveError`` naming it, because "no token" would send
    the caller looking for the wrong problem.
    """
    from_env = os.environ.get(ADMIN_TOKEN_ENV)
    if from_env:
        return from_env
    path = admin_token_path(home)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise WattserveError(f"cannot read the admin token file {path}: {why}") from None
    return token or None


def missing_token_message(home: Path | None = None) -> str:
    """One line saying where the admin token was looked for, and how to create it."""
    return (
        f"no admin token: set {ADMIN_TOKEN_ENV}, pass --token, or create "
        f"{admin_token_path(home)} (start `wattserve serve` once to create it)"
    )
