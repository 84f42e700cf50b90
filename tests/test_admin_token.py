"""The admin token: generated once into the state dir, private, and what the CLI reads."""

from __future__ import annotations

import stat

import pytest

from wattserve._admin_client import default_admin_token
from wattserve.cluster.settings import AdminTokenError, ensure_admin_token


def test_first_start_writes_a_private_token_that_later_starts_and_the_cli_reuse(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("WATTSERVE_ADMIN_TOKEN", raising=False)
    token = ensure_admin_token(tmp_path)
    path = tmp_path / "admin-token"
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_admin_token(tmp_path) == token
    assert default_admin_token(tmp_path) == token


def test_a_token_file_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WATTSERVE_ADMIN_TOKEN", raising=False)
    ensure_admin_token(tmp_path)
    (tmp_path / "admin-token").chmod(0o644)
    with pytest.raises(AdminTokenError, match="chmod 600"):
        ensure_admin_token(tmp_path)


def test_the_environment_wins_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTSERVE_ADMIN_TOKEN", "from-env")
    assert ensure_admin_token(tmp_path) == "from-env"
    assert not (tmp_path / "admin-token").exists()
