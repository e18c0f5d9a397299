"""The real app over HTTP, shared by the hardening tests of one session."""

from __future__ import annotations

import pytest

from tests.hardening.dash_http import CallbackReply, DashHttp


@pytest.fixture(scope="session")
def http(memlens_app) -> DashHttp:
    """A test client of the app that posts callbacks as the renderer does."""
    return DashHttp(memlens_app.app)


def alert_text(reply: CallbackReply, alert_id: str) -> str:
    """The message of ``alert_id`` in a 200 reply that opened it; fails the test otherwise."""
    assert reply.status == 200, reply.text[:300]
    assert "Traceback" not in reply.text
    assert reply.get(f"{alert_id}.is_open") is True, (alert_id, reply.outputs, reply.side)
    message = reply.get(f"{alert_id}.children")
    assert isinstance(message, str) and message.strip(), message
    return message
