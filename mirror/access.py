"""Authorization: which principal may pull which repositories of which upstream.

Pull only: the mirror is read-only. Without rules, whoever authenticated (or an
anonymous client, where anonymous access is on) may pull everything the mirror
serves; once any rule exists, whatever no rule allows is denied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.config import AccessRule
from mirror.identity import Principal


@dataclass(frozen=True, slots=True)
class Rule:
    users: frozenset[str]
    groups: frozenset[str]
    anonymous: bool
    upstreams: tuple[str, ...]
    repositories: tuple[str, ...]

    def applies_to(self, who: Principal) -> bool:
        if who.user is None:
            return self.anonymous
        return "*" in self.users or who.user in self.users or bool(self.groups & who.groups)

    def allows(self, upstream: str, repo: str) -> bool:
        return ("*" in self.upstreams or upstream in self.upstreams) and any(
            fnmatchcase(repo, pattern) for pattern in self.repositories
        )


class Access:
    def __init__(self, rules: Sequence[AccessRule], groups: Mapping[str, Sequence[str]]) -> None:
        self._rules = tuple(
            Rule(
                frozenset(r.users),
                frozenset(r.groups),
                r.anonymous,
                tuple(r.upstreams),
                tuple(r.repositories),
            )
            for r in rules
        )
        # Membership by user, for the principal's groups.
        self._groups: dict[str, set[str]] = {}
        for group, members in groups.items():
            for member in members:
                self._groups.setdefault(member, set()).add(group)

    @property
    def restricted(self) -> bool:
        return bool(self._rules)

    def groups_of(self, user: str) -> frozenset[str]:
        return frozenset(self._groups.get(user, ()))

    def allows(self, who: Principal, upstream: str, repo: str) -> bool:
        if not self._rules:
            return True
        return any(r.applies_to(who) and r.allows(upstream, repo) for r in self._rules)

    def may_pull_anything(self, who: Principal) -> bool:
        """Whether any rule applies to this principal at all (the base endpoint's
        answer to an anonymous client: log in, or go ahead)."""
        return not self._rules or any(r.applies_to(who) for r in self._rules)
