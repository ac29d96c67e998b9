"""Registrable domains (eTLD+1), from the Public Suffix List bundled with `publicsuffixlist`.

Used to decide whether a token realm belongs to its registry: `auth.docker.io` and
`registry-1.docker.io` share `docker.io`, while `a.example.co.uk` and `b.example2.co.uk`
share only the public suffix `co.uk`, which is not enough. No network access: the list
ships inside the package.
"""

from __future__ import annotations

from functools import cache

from publicsuffixlist import PublicSuffixList


@cache
def _list() -> PublicSuffixList:
    return PublicSuffixList()  # parses the bundled list once, on first use


def registrable_domain(host: str) -> str | None:
    """`registry-1.docker.io` -> `docker.io`; None for a bare public suffix or junk."""
    domain: str | None = _list().privatesuffix(host.lower().rstrip("."))
    return domain
