"""Which repositories of an upstream the mirror may fetch: allow and deny patterns.

Checked before any upstream request, so a denied name costs nothing upstream. Patterns
are fnmatch patterns on the upstream's repository name (`library/alpine`, `myorg/*`);
deny wins over allow, and an empty allow list allows everything not denied.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.errors import RegistryError


@dataclass(frozen=True, slots=True)
class RepoPolicy:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def allows(self, repo: str) -> bool:
        if any(fnmatchcase(repo, p) for p in self.deny):
            return False
        return not self.allow or any(fnmatchcase(repo, p) for p in self.allow)

    def check(self, upstream: str, repo: str) -> None:
        if not self.allows(repo):
            raise RegistryError(
                "DENIED", f"repository {repo} of {upstream} is not served by this mirror"
            )
