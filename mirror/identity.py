"""Who is asking: the client a request is served for, set once per request.

The registry routes authenticate a request (mirror.clientauth) and set `current`;
code further down (per-client limits, logs) reads it without being handed it. Without
authentication configured every client is anonymous, known by its address.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    # The user name (htpasswd user, static token name, client certificate CN), or None
    # for an anonymous client.
    user: str | None
    address: str  # the client's IP address, as the listener saw it
    groups: frozenset[str] = field(default_factory=frozenset)
    # A token from the mirror's realm holds the repositories (as the client names them)
    # it was issued for; None: not limited by a token (Basic, robot token, certificate).
    repositories: frozenset[str] | None = None

    @property
    def anonymous(self) -> bool:
        return self.user is None

    @property
    def client_key(self) -> str:
        """What per-client limits count by: the user, else the address."""
        return f"user:{self.user}" if self.user is not None else f"addr:{self.address}"


current: ContextVar[Principal | None] = ContextVar("mirror_principal", default=None)
