"""The admission webhooks: who created a FineTuneJob (spec.userId, the trainer's USER_ID), and
the spec of a launched job, which no longer changes but for spec.suspend.

The API server sends every FineTuneJob CREATE here (a MutatingWebhookConfiguration installed by the
chart). The requester's identity comes from the API server's authentication, so it cannot be
forged by the manifest: a job without spec.userId gets the requester's username, a job that names
someone else is refused. Platforms that submit on behalf of users impersonate them
(`kubectl --as alice`, the `Impersonate-User` header). A CEL rule in the CRD keeps the field as
recorded afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf

from finetune_operator import api, launched

# The webhook's URL paths are the handler ids: the chart's webhook configurations name them.
RECORD_USER = "record-user"
LAUNCHED_SPEC = "launched-spec"


class UserMismatchError(ValueError):
    """spec.userId names someone other than the requester."""


def recorded_user(spec_user: str | None, username: str) -> str:
    """The user to record for a new job. Pure, so the rule is tested without a server."""
    if not username:
        raise UserMismatchError("the request carries no user name: the API server did not authenticate it")
    if spec_user is None or spec_user == username:
        return username
    raise UserMismatchError(
        f"spec.userId: got {spec_user!r}, but this request comes from {username!r}: the operator "
        "records the creating user (fix: remove spec.userId, or create the job as that user, e.g. "
        f"kubectl create --as {spec_user})"
    )


def serve(settings: kopf.OperatorSettings, registry: kopf.OperatorRegistry, port: int, cert_dir: str) -> None:
    """Registers the handlers with their server, at start-up: kopf refuses admission handlers that
    have no server, and the webhooks are optional (FINETUNE_OPERATOR_WEBHOOK_PORT=0). The chart owns
    the webhook configurations; kopf only serves them."""
    kopf.on.mutate(
        api.GROUP, api.VERSION, api.PLURAL, operations=["CREATE"], id=RECORD_USER, registry=registry
    )(record_user)
    kopf.on.validate(
        api.GROUP, api.VERSION, api.PLURAL, operations=["UPDATE"], id=LAUNCHED_SPEC, registry=registry
    )(refuse_launched_edits)
    settings.admission.server = webhook_server(port, cert_dir)
    settings.admission.managed = None


def record_user(
    spec: kopf.Spec, userinfo: Mapping[str, Any], patch: kopf.Patch, warnings: list[str], **_: Any
) -> None:
    try:
        user = recorded_user(spec.get("userId"), str(userinfo.get("username", "")))
    except UserMismatchError as exc:
        raise kopf.AdmissionError(str(exc), code=403) from exc
    if spec.get("userId") != user:
        patch.spec["userId"] = user
        warnings.append(f"spec.userId recorded as {user!r} (the creating user)")


def refuse_launched_edits(spec: kopf.Spec, **kwargs: Any) -> None:
    # kopf passes the stored object as `old`; its typed handler protocol does not name it.
    problem = launched.edit_refusal(kwargs.get("old"), spec)
    if problem:
        raise kopf.AdmissionError(problem, code=422)


def webhook_server(port: int, cert_dir: str) -> kopf.WebhookServer:
    """HTTPS on every interface; the certificate comes from a mounted Secret, and kopf reloads it
    when the files change (a renewed certificate needs no restart)."""
    certs = Path(cert_dir)
    for name in ("tls.crt", "tls.key"):
        if not (certs / name).is_file():
            raise kopf.PermanentError(
                f"FINETUNE_OPERATOR_WEBHOOK_CERT_DIR: {cert_dir!r} has no {name} (fix: mount the "
                "webhook's TLS Secret there, or set FINETUNE_OPERATOR_WEBHOOK_PORT=0 to disable it)"
            )
    return kopf.WebhookServer(
        addr="0.0.0.0",  # noqa: S104  (the API server reaches the pod through a Service)
        port=port,
        certfile=str(certs / "tls.crt"),
        pkeyfile=str(certs / "tls.key"),
    )
