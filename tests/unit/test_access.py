"""engine.core.access: the one set of job/image rules, and the front doors that must apply them alike."""

from __future__ import annotations

import itertools
from functools import partial

import anyio
import pytest

from engine.core.access import (
    KNOWN_SCOPES,
    Principal,
    TokenStore,
    may_cancel,
    may_interrupt,
    may_read_image,
    may_view_job,
)
from engine.core.errors import Forbidden, HooocusError, InvalidRequest, NotFound
from engine.core.jobs import Engine
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner

ALL_SCOPE_SETS = [frozenset(c) for n in range(len(KNOWN_SCOPES) + 1)
                  for c in itertools.combinations(sorted(KNOWN_SCOPES), n)]


def _outcome(principal: Principal, owner: str) -> str:
    """The cancel answer the rules give, spelled the way the doors answer it."""
    if may_cancel(principal, owner):
        return "ok"
    return "forbidden" if may_view_job(principal, owner) else "not_found"


@pytest.mark.parametrize("scopes", ALL_SCOPE_SETS, ids=lambda s: ",".join(sorted(s)) or "none")
def test_rules_over_every_scope_combination(scopes: frozenset[str]) -> None:
    me = Principal("alice", scopes)
    admin = "admin" in scopes
    assert may_view_job(me, "alice") and may_view_job(me, "bob") is admin
    assert may_cancel(me, "alice") is bool(scopes & {"cancel:own", "cancel:any", "admin"})
    assert may_cancel(me, "bob") is bool(scopes & {"cancel:any", "admin"})
    # Someone else's job is never "forbidden": that would tell a prober the id exists.
    assert _outcome(me, "bob") in ("ok", "not_found")
    assert may_read_image(me, {"alice", "carol"}) and may_read_image(me, ()) is admin
    assert may_interrupt(me) is admin
    assert me.effective_scopes() == (KNOWN_SCOPES if admin else scopes)


def test_token_file_rules_live_in_the_engine() -> None:
    store = TokenStore.parse("carol carol-token-0123456789 generate  # a comment\n"
                             "dave dave-token-0123456789abc admin\n")
    assert store.verify("carol-token-0123456789") == Principal("carol", frozenset({"generate"}))
    assert store.verify("dave-token-0123456789abc").effective_scopes() == KNOWN_SCOPES
    assert store.verify("carol-token-012345678") is None and store.verify(None) is None
    with pytest.raises(InvalidRequest) as info:
        TokenStore.parse("ok ok-token-0123456789\nerin erin-tok#en-0123456789 admin\n", source="t.txt")
    assert "t.txt:2" in info.value.message and info.value.loc == ("tokens", 2)


def _runtime() -> Runtime:
    images = ImageStore()
    engine = Engine(FakeRunner(), max_queue=8, image_sink=images.put)  # never started: jobs stay queued
    return Runtime(settings=Settings(), engine=engine, images=images)


def _code(call) -> str:
    try:
        call()
    except (NotFound, Forbidden) as exc:
        return exc.code
    except HooocusError as exc:  # pragma: no cover - a different refusal is a failure below
        return f"unexpected {exc.code}"
    return "ok"


@pytest.mark.parametrize("scopes", ALL_SCOPE_SETS, ids=lambda s: ",".join(sorted(s)) or "none")
def test_websocket_and_mcp_doors_answer_cancel_and_view_alike(scopes: frozenset[str]) -> None:
    """Both doors call engine.core.access; for every scope set and both owners they give the same
    answer as the rules (ok / forbidden / not_found), for viewing and for cancelling."""
    from hooocus_mcp.backend import LocalBackend
    from hooocus_ws import service
    from hooocus_ws.app import create_app

    runtime = _runtime()
    ctx = create_app(runtime, tokens=TokenStore(), manage_runtime=False).state.hooocus
    backend = LocalBackend(runtime)
    caller = Principal("alice", scopes)
    for owner in ("alice", "bob"):
        job_id = runtime.engine.submit({"prompt": "x"}, owner=owner).job_id
        view_expected = "ok" if may_view_job(caller, owner) else "not_found"
        assert _code(partial(service.visible_job, ctx, caller, job_id)) == view_expected, owner
        assert _code(partial(anyio.run, backend.job, job_id, caller)) == view_expected, owner
        ws = _code(partial(service.check_cancel_allowed, ctx, caller, job_id))
        mcp = _code(partial(anyio.run, backend.cancel, job_id, caller))  # cancels it when allowed
        assert ws == mcp == _outcome(caller, owner), owner
