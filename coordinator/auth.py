"""Broker authentication backed by the coordinator's store.

The embedded broker knows nothing of databases; it is handed ``store_authenticator``.
Tokens are checked against the stored ``$7$`` hash (see ``broker.credentials``); revoked
principals and unknown roles are refused.
"""

from __future__ import annotations

import logging

from broker.acl import Principal, Role
from broker.credentials import verify_token
from broker.embedded import Authenticator
from coordinator.errors import CoordinatorError
from coordinator.store import Store

log = logging.getLogger(__name__)


def store_authenticator(store: Store) -> Authenticator:
    """An authenticator that looks principals up in ``store`` (thread-safe, blocking)."""

    def authenticate(user: str, token: str) -> Principal | None:
        if not user or not token:
            return None
        try:
            found = store.principal_hash(user)
        except CoordinatorError as err:
            log.error("cannot check credentials of %s: %s", user, err)
            return None
        if found is None:
            return None
        role, stored = found
        if not verify_token(token, stored):
            return None
        try:
            return Principal(id=user, role=Role(role))
        except ValueError:
            log.warning("principal %s has unknown role %r; refused", user, role)
            return None

    return authenticate
