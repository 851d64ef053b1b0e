"""Who may do what: principals, the bearer-token store, and the job/image access rules.

Every front door (websocket, HTTP, MCP over HTTP and stdio) authenticates with the same tokens and
applies the same rules, so both live here once and the doors call them.

Tokens come from a file or ``HOOOCUS_TOKENS``: one per line ``NAME TOKEN SCOPES`` (scopes
comma-separated: generate, cancel:own, cancel:any, admin); ``#`` at the start of a line or after
whitespace starts a comment, and a ``#`` inside a field is refused (it used to cut a token short
and drop its scopes without a word). Only SHA-256 digests are kept in memory, and every check
compares digests in constant time against every entry, so neither timing nor length leaks which
token was close.

The rules (reliability matrix row 16: a job id or image hash is never an existence oracle, so a
caller who may not see something gets ``not_found``, never ``forbidden``):

- a job belongs to the principal that submitted it (by ``name``), not to a connection;
- the owner and admins see a job (:func:`may_view_job`);
- cancelling needs ``cancel:own`` on one's own job or ``cancel:any`` on any job
  (:func:`may_cancel`); an owner without the scope is told ``forbidden``, anyone else ``not_found``;
- an image may be read by a principal whose job produced it, or by an admin (:func:`may_read_image`):
  its PNG metadata holds the prompt;
- ``admin`` implies every scope (:meth:`Principal.can`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import InvalidRequest

KNOWN_SCOPES = frozenset({"generate", "cancel:own", "cancel:any", "admin"})
DEFAULT_SCOPES = frozenset({"generate", "cancel:own"})
#: Shortest token the store accepts: tokens are meant to be random, and guessing must stay hopeless.
MIN_TOKEN_CHARS = 16
#: A comment: '#' at the start of the line or after whitespace, to the end of the line.
_COMMENT_RE = re.compile(r"(^|\s)#.*$")


@dataclass(frozen=True)
class Principal:
    """Who is calling. Jobs belong to a principal (by ``name``), not to a socket."""

    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def effective_scopes(self) -> frozenset[str]:
        """Every scope :meth:`can` grants, spelled out (for checks that compare scope strings
        literally, such as the MCP SDK's ``RequireAuthMiddleware``)."""
        return frozenset(s for s in KNOWN_SCOPES | self.scopes if self.can(s))


# -- the rules --------------------------------------------------------------------------------------


def may_generate(principal: Principal) -> bool:
    return principal.can("generate")


def sees_every_job(principal: Principal) -> bool:
    """Admins see everyone's jobs (and their owners and file paths) in listings."""
    return principal.can("admin")


def may_interrupt(principal: Principal) -> bool:
    """Stopping the running job whoever owns it (the websocket ``interrupt`` message): admins only."""
    return principal.can("admin")


def may_view_job(principal: Principal, job_owner: str) -> bool:
    """The owner, or an admin."""
    return job_owner == principal.name or principal.can("admin")


def may_cancel(principal: Principal, job_owner: str) -> bool:
    """``cancel:own`` on one's own job, ``cancel:any`` (or admin) on any job.

    When this is False, answer ``forbidden`` if :func:`may_view_job` is True (the owner lacks the
    scope), else ``not_found``."""
    if principal.can("cancel:any"):
        return True
    return job_owner == principal.name and principal.can("cancel:own")


def may_read_image(principal: Principal, owners: Iterable[str]) -> bool:
    """An admin, or a principal whose job produced the image (``owners``: every principal that did)."""
    return principal.can("admin") or principal.name in owners


# -- the token store --------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenStore:
    def __init__(self, entries: list[tuple[Principal, bytes]] | None = None) -> None:
        self._entries = list(entries or [])

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, *, source: str = "tokens") -> TokenStore:
        entries: list[tuple[Principal, bytes]] = []
        names: set[str] = set()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = _COMMENT_RE.sub("", raw).strip()
            if not line:
                continue
            if "#" in line:
                raise InvalidRequest(f"{source}:{lineno}: '#' inside a name, token or scopes; a comment must "
                                     "start a line or follow a space", loc=("tokens", lineno))
            parts = line.split()
            if len(parts) not in (2, 3):
                raise InvalidRequest(f"{source}:{lineno}: expected 'NAME TOKEN SCOPES'", loc=("tokens", lineno))
            name, token = parts[0], parts[1]
            scopes = frozenset(s for s in (parts[2].split(",") if len(parts) == 3 else DEFAULT_SCOPES) if s)
            unknown = scopes - KNOWN_SCOPES
            if unknown:
                raise InvalidRequest(f"{source}:{lineno}: unknown scope(s) {sorted(unknown)}; "
                                     f"known: {sorted(KNOWN_SCOPES)}", loc=("tokens", lineno))
            if len(token) < MIN_TOKEN_CHARS:
                raise InvalidRequest(f"{source}:{lineno}: token for {name!r} is shorter than {MIN_TOKEN_CHARS} "
                                     "characters", loc=("tokens", lineno))
            if name in names:
                raise InvalidRequest(f"{source}:{lineno}: duplicate name {name!r}", loc=("tokens", lineno))
            names.add(name)
            entries.append((Principal(name, scopes), _digest(token)))
        return cls(entries)

    @classmethod
    def from_file(cls, path: Path) -> TokenStore:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot read tokens file {path}: {exc.strerror}", loc=("tokens_file",)) from None
        return cls.parse(text, source=str(path))

    @classmethod
    def generated(cls, name: str = "local") -> tuple[TokenStore, str]:
        """A store with one fresh all-scopes token (loopback servers with no token configured)."""
        token = secrets.token_urlsafe(32)
        return cls([(Principal(name, frozenset(KNOWN_SCOPES)), _digest(token))]), token

    def verify(self, token: str | None) -> Principal | None:
        """The principal for ``token``, or None. Constant time in the token's value."""
        if not token:
            return None
        digest = _digest(token)
        found: Principal | None = None
        for principal, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = principal
        return found
