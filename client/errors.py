"""Errors of the client family: the one root users catch is :class:`ClientError`.

Every error the client API raises is a ``ClientError`` (itself an ``XcloudError``):
what the bus or the codec raise (``BusError``, ``WireError``) is translated at the API
boundary by :func:`translated`, into words about what the user did or what is down,
with the original kept as ``__cause__``. So the shell and scripts catch one class, and
no failure of one request can end a shell session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from schemas.errors import WireError, XcloudError


class ClientError(XcloudError):
    """Root of client-side errors (bad usage, no config, a refused request, a peer down)."""


class NotConfigured(ClientError):
    """No broker URL / credentials to use."""


class InvalidRequest(ClientError):
    """What was asked cannot be sent (a negative count, a lease out of range, ...)."""

    code = "invalid"


class Unreachable(ClientError):
    """The broker or a peer (coordinator, worker) could not be reached or did not answer."""

    code = "unavailable"


class CoordinatorDown(Unreachable):
    """The coordinator's retained status on the broker says it is down."""


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise any ``BusError``/``WireError`` of the block as a ``ClientError``.

    ``what`` names the action in the user's words ("list the workers"). Request
    timeouts and refusals are handled closer to the request (they know who was asked);
    this is the net under everything else the bus can raise.
    """
    from broker.bus import BusError

    try:
        yield
    except ClientError:
        raise
    except WireError as err:
        raise InvalidRequest(f"cannot {what}: {err.reason}") from err
    except BusError as err:
        raise Unreachable(f"cannot {what}: {err}") from err
