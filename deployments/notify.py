"""Notifications on ``twinflow.asset.at_risk``: a Prefect automation that sends each announcement
through a notification block (a webhook by default; Slack, Teams, e-mail … are other block types).

The automation lives on the Prefect server: the health flow only emits the event (once per band rise,
see :mod:`twinflow.tasks.health.alerts`), and the server's actions service renders the message from
the event and calls the block. So a flow that crashed after emitting still notifies, and people
change who is told (the block) without touching a deployment.

- :func:`webhook_block`: save a ``CustomWebhookNotificationBlock`` whose JSON body carries the
  notification's subject and text (``{"subject": ..., "text": ...}``), returns ``custom-webhook/<name>``.
- :func:`register_at_risk_notification`: create or update the automation
  :data:`AT_RISK_AUTOMATION` for a block ``<block-type-slug>/<name>`` (idempotent by name).

``twinflow notify at-risk --webhook URL`` (or ``--block slug/name``) does both.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twinflow.errors import ConfigError
from twinflow.events import ASSET_AT_RISK

__all__ = ["AT_RISK_AUTOMATION", "SUBJECT", "BODY", "at_risk_automation", "register_at_risk_notification",
           "webhook_block"]

AT_RISK_AUTOMATION = "notify-asset-at-risk"
SUBJECT = "twinflow: {{ event.payload.asset }} is {{ event.payload.band }} risk ({{ event.payload.dataset }})"
BODY = ("Asset {{ event.payload.asset }} of {{ event.payload.dataset }} entered the "
        "{{ event.payload.band }} risk band: P(failure within {{ event.payload.horizon }}) = "
        "{{ event.payload.p_failure }}. Action: {{ event.payload.action }}, due by {{ event.payload.due_by }}. "
        "Health run: {{ event.payload.mlflow_run_id }} ({{ event.payload.run_key }}).")


def webhook_block(url: str, name: str = "twinflow-at-risk") -> str:
    """Save (or overwrite) a webhook notification block posting ``{"subject", "text"}`` as JSON to ``url``.

    Returns:
        The block's ``custom-webhook/<name>`` reference.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(name=name, url=url, method="POST",
                                           json_data={"subject": "{{subject}}", "text": "{{body}}"})
    block.save(name, overwrite=True)
    return f"{CustomWebhookNotificationBlock.get_block_type_slug()}/{name}"


def _block_document_id(block: str) -> UUID:
    from prefect.client.orchestration import get_client

    if block.count("/") != 1:
        raise ConfigError(f"a notification block is named '<block-type-slug>/<name>', got {block!r}")
    slug, name = block.split("/")
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(name=name, block_type_slug=slug).id
        except Exception as exc:  # noqa: BLE001 - ObjectNotFound and friends: say which block
            raise ConfigError(f"notification block {block!r} not found on the Prefect server ({exc})") from None


def at_risk_automation(block_document_id: UUID, *, dataset: str | None = None) -> Any:
    """The automation: every ``twinflow.asset.at_risk`` event (of ``dataset``, or any) sends one notification."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    match = {"prefect.resource.id": f"twinflow.asset.{dataset}.*" if dataset else "twinflow.asset.*"}
    return Automation(
        name=AT_RISK_AUTOMATION,
        description="Tell people when an asset enters a risk band (once per band rise; see twinflow's health stage).",
        enabled=True,
        trigger=EventTrigger(expect={ASSET_AT_RISK}, match=match, for_each={"prefect.resource.id"},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def register_at_risk_notification(block: str, *, dataset: str | None = None) -> UUID:
    """Create or replace the at-risk automation for notification block ``<slug>/<name>``.

    Raises:
        ConfigError: the block does not exist or is misnamed.
    """
    from prefect.client.orchestration import get_client

    auto = at_risk_automation(_block_document_id(block), dataset=dataset)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(AT_RISK_AUTOMATION):
            client.delete_automation(old.id)
    return auto.create().id
