"""Errors of the broker family (embedded broker, credentials, ACL export)."""

from __future__ import annotations

from schemas.errors import XcloudError


class BrokerError(XcloudError):
    """Root of the broker family: the embedded broker could not do what was asked."""


class PortInUseError(BrokerError):
    """The listening port is already taken, usually by another MQTT broker.

    Carries ``host``/``port`` so a CLI can suggest another one.
    """

    def __init__(self, host: str, port: int, what: str = "MQTT") -> None:
        super().__init__(
            f"port {port} on {host} is already in use (another {what} broker?); "
            "choose another with --port"
        )
        self.host = host
        self.port = port
