"""Errors of the client family."""

from __future__ import annotations

from schemas.errors import XcloudError


class ClientError(XcloudError):
    """Root of client-side errors (bad usage, no config, a refused request)."""


class NotConfigured(ClientError):
    """No broker URL / credentials to use."""
