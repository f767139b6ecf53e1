"""The rule the admission webhook applies to spec.userId on CREATE."""

from __future__ import annotations

import pytest

from finetune_operator.admission import UserMismatchError, recorded_user


@pytest.mark.parametrize(
    ("spec_user", "username", "recorded"),
    [
        (None, "alice", "alice"),
        ("alice", "alice", "alice"),
        (None, "system:serviceaccount:ml:pipeline", "system:serviceaccount:ml:pipeline"),
    ],
)
def test_the_creating_user_is_recorded(spec_user: str | None, username: str, recorded: str) -> None:
    assert recorded_user(spec_user, username) == recorded


def test_a_job_naming_another_user_is_refused_with_the_fix() -> None:
    with pytest.raises(UserMismatchError) as caught:
        recorded_user("mallory", "alice")
    message = str(caught.value)
    assert "spec.userId" in message and "'mallory'" in message and "'alice'" in message
    assert "--as mallory" in message


def test_an_unauthenticated_request_is_refused() -> None:
    with pytest.raises(UserMismatchError, match="no user name"):
        recorded_user(None, "")
