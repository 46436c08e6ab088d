"""Joining a federated round on the device: the steps every model's contribution shares, in one
place (the ranker's :meth:`~sottovoce.device.Personalizer.contribute` and the collaborative
model's :meth:`~sottovoce.device._collaborator.Collaborator.contribute` differ only in what
they compute and upload).

:func:`enter_round`, in order:

1. the spec against the device's own copy of the policy, its model and version, and its own
   privacy ledger (dp-accounting, whatever the spec claims): a ``SpecRefused`` is logged and
   raised, nothing computed or queued;
2. central mode: a device that could take part (eligible, consenting) is charged for the round
   before its coin, since the round's guarantee rests on the secret coin;
3. the spec's coin, keyed with the device secret (``None``: not in this round);
4. once per round: a round whose upload is queued (or sent) already returns its key;
5. the user's consent to federated training decides, logged.

:func:`seal_and_record` then seals the upload (clip, noise in local mode, pseudonym, signature,
HPKE to the region's key) and records the model state, the outbox entry, the decision and (local
mode: the aggregator sees the upload) the privacy charge in one transaction.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sottovoce.device._errors import DeviceError
from sottovoce.device._store import EventStore, ModelWeights
from sottovoce.policy import Decision, PrivacyMode, Purpose
from sottovoce.sync import (
    RoundSpec,
    SpecRefused,
    check_budget,
    check_spec,
    period_label,
)
from sottovoce.sync._budget import Charge

__all__ = ["Ticket", "enter_round", "seal_and_record"]


@dataclass(frozen=True)
class Ticket:
    """A device admitted to a round: what sealing and recording its upload need."""

    period: str
    key: str  # the upload's idempotency key
    decision: Decision  # the consent decision, logged with the upload
    charge: Charge  # the round's privacy charge (already taken in central mode)


def enter_round(store: EventStore, user_id: str, spec: RoundSpec, *, model_id: str,
                version: int, dim: int, eligible: bool) -> Ticket | str | None:  # fmt: skip
    """Steps 1 to 5 of the module docstring: a :class:`Ticket` to compute and upload, the key of
    this round's upload when it is queued already, or ``None`` when the coin says no."""
    region = store.region
    try:
        check_spec(spec, region)
        if spec.model_id != model_id or spec.model_version != version:
            raise SpecRefused(f"refusing round {spec.round_id!r}: it is for version "
                              f"{spec.model_version} of model {spec.model_id[:12]}…; this "
                              f"device has version {version} of {model_id[:12]}…",
                              rule="model")  # fmt: skip
        charge = check_budget(spec, region, history=store.privacy_history(region.id), dim=dim,
                              now=store.now())  # fmt: skip
    except SpecRefused as refused:
        store.contribution(user_id, spec.round_id, refused=refused)  # logged
        raise
    central = spec.mode is PrivacyMode.CENTRAL
    if central and eligible and store.allows(user_id, Purpose.FEDERATED_TRAINING):
        store.charge(charge)  # whether or not the coin picks the device
    if not store.keys.in_round(spec):
        return None
    period = period_label(spec)
    key = store.keys.upload_key(spec, period=period)
    if store.in_outbox(key):
        return key  # queued already (or sent): once per round
    decision = store.contribution(user_id, spec.round_id)
    if not decision.allowed:
        refusal = store.refusal(user_id, Purpose.FEDERATED_TRAINING)
        if refusal is not None:
            raise refusal
        raise DeviceError(decision.sentence)  # the consent rules and the engine disagree
    return Ticket(period, key, decision, charge)


def seal_and_record(store: EventStore, user_id: str, spec: RoundSpec, ticket: Ticket, *,
                    upload: npt.NDArray[np.floating], model: ModelWeights,
                    state: npt.NDArray[np.float32],
                    rng: np.random.Generator | None = None) -> str:  # fmt: skip
    """Seal ``upload`` for the round and record it with ``model`` and ``state`` (see the module
    docstring); returns the upload's idempotency key."""
    hpke = base64.b64decode(store.region.key("hpke").key)
    sealed = store.keys.seal(np.asarray(upload, np.float32), spec=spec, aggregator_hpke_key=hpke,
                             period=ticket.period, upload_key=ticket.key, rng=rng)  # fmt: skip
    local = spec.mode is not PrivacyMode.CENTRAL
    charge = ticket.charge if local else None  # central: charged before the coin
    store.queue_local_round(user_id, sealed=sealed, deadline=spec.deadline, model=model,
                            state=state, decision=ticket.decision, charge=charge)  # fmt: skip
    return sealed.idempotency_key
