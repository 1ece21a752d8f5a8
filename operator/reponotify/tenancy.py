"""
Tenancy: which repositories a namespace may subscribe to.

Quay only lets repository admins add notifications. In a shared cluster the
equivalent is the cluster administrators' word, written where tenants usually
cannot write: the namespace's annotation

    reponotify.dev/allowed-repositories: "acme/*,tools/builder"

a comma-separated list of repositories or globs over "namespace/name" (``*``
and ``?``; ``*`` also crosses ``/``). Without the annotation, the operator's
``--repository-policy`` decides: ``allow`` (every repository) or ``deny`` (none).
An empty annotation allows nothing. A notification whose spec.repository is
itself a glob (``acme/*``) is allowed only when one allowance pattern covers
every repository the glob matches (see :func:`_covers`).
"""
import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from typing import Any

ANNOTATION = 'reponotify.dev/allowed-repositories'


@dataclasses.dataclass(frozen=True)
class Allowance:
    """What one namespace may subscribe to."""
    patterns: tuple[str, ...] | None  # None: no annotation, the default policy applies
    default_allow: bool

    def permits(self, repository: str) -> bool:
        if self.patterns is None:
            return self.default_allow
        if '*' in repository:  # a glob notification (acme/*) subscribes to every repository it matches
            return any(_covers(pattern, repository) for pattern in self.patterns)
        return any(_compiled(pattern).fullmatch(repository) for pattern in self.patterns)

    def explain(self, namespace: str, repository: str) -> str:
        if self.patterns is None:
            return (f"namespace {namespace} has no {ANNOTATION} annotation and the operator's repository "
                    f"policy is deny: ask a cluster administrator to allow {repository}")
        allowed = ', '.join(self.patterns) or 'nothing'
        return (f"{repository} is not among the repositories namespace {namespace} may subscribe to "
                f"({ANNOTATION}: {allowed}); ask a cluster administrator")


def allowance_from(annotations: Mapping[str, Any] | None, *, default_allow: bool) -> Allowance:
    """The allowance a namespace's annotations give."""
    value = (annotations or {}).get(ANNOTATION)
    if value is None:
        return Allowance(patterns=None, default_allow=default_allow)
    patterns = tuple(part.strip() for part in str(value).split(',') if part.strip())
    return Allowance(patterns=patterns, default_allow=default_allow)


def _covers(pattern: str, glob: str) -> bool:
    """
    Whether an allowance pattern covers every repository a glob notification matches.

    Only patterns whose wildcards are all ``*`` are considered: then each ``*`` of the glob
    (a literal ``*`` to the pattern) is matched by a ``*`` of the pattern, which takes any
    text, so whatever the glob's ``*`` stands for still matches. A ``?`` or ``[...]`` of the
    pattern could match the glob's ``*`` character itself ("acme/we?" would let "acme/we*"
    through) and is never taken as covering a glob.
    """
    return '?' not in pattern and '[' not in pattern and _compiled(pattern).fullmatch(glob) is not None


_CACHE: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    compiled = _CACHE.get(pattern)
    if compiled is None:
        compiled = _CACHE[pattern] = re.compile(fnmatch.translate(pattern))
    return compiled
