"""Whose conversation a chat request continues: the thread id it names, and whether its key may use it.

The id comes from the X-Atelier-Thread header, else the OpenAI `user` field, else
metadata.thread_id, else a fresh one. Each thread belongs to the key (owner, agents/auth.py) that
started it, kept in the feedback store; another key gets 404, so no key can read or continue a
conversation that is not its own.
"""

from __future__ import annotations

import logging
import unicodedata
import uuid
from typing import TYPE_CHECKING

from fastapi import Request

from agents.api_schemas import ChatCompletionRequest
from agents.api_stream import ApiError
from agents.auth import ANONYMOUS

if TYPE_CHECKING:
    from agents.orchestrator import Orchestrator
    from atelier.feedback import FeedbackStore

log = logging.getLogger(__name__)

THREAD_HEADER = "X-Atelier-Thread"


def thread_of(request: Request, body: ChatCompletionRequest) -> tuple[str, bool]:
    """(thread id, whether the client chose it): X-Atelier-Thread header, else the OpenAI `user` field, else
    metadata.thread_id, else a fresh id. Any printable text (emoji, CJK) will do; control characters: 400."""
    candidates = [request.headers.get("x-atelier-thread"), body.user, (body.metadata or {}).get("thread_id")]
    thread = next((c.strip() for c in candidates if isinstance(c, str) and c.strip()), None)
    if thread is None:
        return uuid.uuid4().hex, False
    if len(thread) > 255:
        raise ApiError(400, "thread id longer than 255 characters", param=THREAD_HEADER)
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in thread):
        raise ApiError(400, "thread id contains control characters (such as NUL, CR or LF); use printable text",
                       param=THREAD_HEADER, code="invalid_thread_id")
    return thread, True


def _has_history(orchestrator: Orchestrator, thread_id: str) -> bool:
    """Whether the orchestrator's memory holds a conversation under `thread_id` (when it cannot tell: yes)."""
    try:
        state = orchestrator.graph.get_state({"configurable": {"thread_id": thread_id}})
        return bool((state.values or {}).get("messages"))
    except Exception:
        log.warning("could not read the memory of thread %r; treating it as taken", thread_id, exc_info=True)
        return True


def claim_thread(state, owner: str, thread_id: str, chosen: bool) -> None:
    """404 unless `owner` may use the thread: theirs already, or new (then it becomes theirs). A thread with
    history but no owner (from `atelier chat`, or from before owners were kept) is open only without keys."""
    store: FeedbackStore = state.feedback
    known = store.thread_owner(thread_id) if chosen else None
    if known is None:
        unowned_ok = not chosen or owner == ANONYMOUS or not _has_history(state.orchestrator, thread_id)
        allowed = store.claim_thread(thread_id, owner, unowned_ok=unowned_ok)
    else:
        allowed = known == owner
    if not allowed:
        raise ApiError(404, "no such thread for this API key; omit X-Atelier-Thread (and user, metadata.thread_id) "
                       "to start a new one", param=THREAD_HEADER, code="thread_not_found")
