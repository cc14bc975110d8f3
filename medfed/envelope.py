"""The one place where medfed's values become Flower records and back.

Weights travel as numpy arrays in an ``ArrayRecord`` (numpy's format, never pickled), numbers in
a ``MetricRecord``, and text (site ids, ledger lines, JSON settings) in a ``ConfigRecord``,
because metric records hold numbers only. Every reader checks what it gets and raises
:class:`EnvelopeError` naming the missing or malformed field, so a broken or hostile message is
refused with a reason instead of crashing a handler.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, RecordDict

from medfed.errors import EnvelopeError, MedfedError, decline_codes
from medfed.types import freeze_arrays

TRAIN: Final = "train"
EVALUATE: Final = "evaluate"
INIT: Final = "query.init"
# Secure aggregation's stages (medfed.secagg): key advertisement, share distribution, opening
# the shares received, and a round's unmasking answer. The masked upload is a TRAIN reply.
SECAGG_KEYS: Final = "query.secagg_keys"
SECAGG_SHARES: Final = "query.secagg_shares"
SECAGG_OPEN: Final = "query.secagg_open"
SECAGG_UNMASK: Final = "query.secagg_unmask"

# Flower error codes of a site's refusal, one per error class (each class's decline_code); the
# reason text is the error's one-line form.
DECLINE_CODES: Final[Mapping[str, int]] = decline_codes()
_CODE_NAMES = {value: key for key, value in DECLINE_CODES.items()}
_ONE_LINE = re.compile(r"^error\[([a-z-]+)\]: ")
# How flwr-clientapp words an exception raised outside the app's handlers (flwr 1.41), e.g. a
# site's app allow-list refusing the bundle: "<class 'module.Name'>:<'message'>".
_RAISED = re.compile(r"^<class '[\w.]+'>:<'(.*)'>$", re.DOTALL)


@dataclass(frozen=True, eq=False)
class RoundRequest:
    """What the aggregator asks of one site for one round (training or evaluation).

    ``project`` and ``planned_rounds`` (the run's total rounds) are there for the site's
    policy, which accepts runs by project and name and limits the rounds of one run.
    """

    run_name: str
    project: str
    round: int
    planned_rounds: int
    model: Mapping[str, Any]
    local_epochs: int
    learning_rate: float | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    proximal_mu: float
    seed: int
    ledger_known: int
    weights: Mapping[str, np.ndarray] | None
    # The aggregator's signed receipt of the ledger_known entries (medfed.privacy.receipt);
    # None from a workspace that has no receipt key.
    ledger_receipt: str | None = None
    # Secure aggregation: the stage's JSON payload (medfed.secagg.wire); None without it.
    secure_aggregation: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class RoundReply:
    """A site's answer to a training round: its weights and the ledger entries it added.

    Nothing else: the patient count the update is weighted by, the loss, the Dice and the
    privacy terms are release and terms entries among ``ledger_lines``, signed by the site.
    """

    site_id: str
    round: int
    weights: Mapping[str, np.ndarray]
    ledger_first_seq: int
    ledger_lines: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class SecureReply:
    """A site's answer to a secure aggregation stage: a JSON payload, and for a masked upload
    the masked vector (uint32, uniformly random on its own) and the site's new ledger lines."""

    site_id: str
    payload: Mapping[str, Any]
    masked: np.ndarray | None = None
    ledger_first_seq: int = 0
    ledger_lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluationReply:
    """A site's answer to an evaluation: the ledger entries it added (the Dice release)."""

    site_id: str
    ledger_first_seq: int
    ledger_lines: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class InitReply:
    """A site's freshly initialised network: the starting global model and its spec."""

    site_id: str
    weights: Mapping[str, np.ndarray]
    spec: Mapping[str, Any]


@dataclass(frozen=True)
class Decline:
    """A site's refusal of a round, as the aggregator reads it."""

    code: str
    reason: str

    @property
    def budget_spent(self) -> bool:
        return self.code == "budget-exceeded"


def _arrays(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {name: Array(np.require(value, requirements="C")) for name, value in weights.items()}
    )


def _read_arrays(content: RecordDict, key: str) -> dict[str, np.ndarray]:
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise EnvelopeError(f"message has no array record {key!r}")
    try:
        return {name: array.numpy() for name, array in record.items()}
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"array record {key!r} holds an unreadable array ({exc})") from None


def _read_frozen_arrays(content: RecordDict, key: str) -> Mapping[str, np.ndarray]:
    """The arrays of record ``key``, read-only, without a copy beyond reading them.

    ``Array.numpy()`` (flwr 1.41) reads each array's bytes into a new ndarray that nothing else
    holds, so the arrays are marked read-only here, with the ndarrays they view, and handed to
    :func:`freeze_arrays` to keep as they are. A reply's weights then cost one copy on arrival,
    not three: the ``SiteUpdate`` made of them holds the same arrays.
    """
    arrays = _read_arrays(content, key)
    for array in arrays.values():
        owner: object = array
        while isinstance(owner, np.ndarray):
            owner.setflags(write=False)
            owner = owner.base
    return freeze_arrays(arrays, copy=False)


def _record(content: RecordDict, key: str, kind: type[Any]) -> Any:
    record = content.get(key)
    if not isinstance(record, kind):
        raise EnvelopeError(f"message has no {kind.__name__} {key!r}")
    return record


def _field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise EnvelopeError(f"message field {key!r} is missing")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise EnvelopeError(f"message field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _json_object(record: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A text field holding a JSON object (model settings, a network spec)."""
    try:
        value = json.loads(_field(record, key, str))
    except json.JSONDecodeError:
        raise EnvelopeError(f"message field {key!r} is not JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError(f"message field {key!r} is not a JSON object")
    return value


def _optional_float(record: Mapping[str, Any], key: str) -> float | None:
    value = _field(record, key, (int, float))
    return None if math.isnan(value) else float(value)


def request_content(request: RoundRequest) -> RecordDict:
    config = ConfigRecord(
        {
            "run_name": request.run_name,
            "project": request.project,
            "round": request.round,
            "planned_rounds": request.planned_rounds,
            "model": json.dumps(dict(request.model), sort_keys=True),
            "local_epochs": request.local_epochs,
            # NaN stands for "unset": config records hold no None.
            "learning_rate": math.nan if request.learning_rate is None else request.learning_rate,
            "noise_multiplier": (
                math.nan if request.noise_multiplier is None else request.noise_multiplier
            ),
            "max_grad_norm": math.nan if request.max_grad_norm is None else request.max_grad_norm,
            "proximal_mu": float(request.proximal_mu),
            "seed": request.seed,
            "ledger_known": request.ledger_known,
            "ledger_receipt": request.ledger_receipt or "",
        }
    )
    if request.secure_aggregation is not None:
        config["secagg"] = json.dumps(dict(request.secure_aggregation), sort_keys=True)
    records: dict[str, Any] = {"config": config}
    if request.weights is not None:
        records["global"] = _arrays(request.weights)
    return RecordDict(records)


def read_request(content: RecordDict) -> RoundRequest:
    config = _record(content, "config", ConfigRecord)
    return RoundRequest(
        run_name=_field(config, "run_name", str),
        project=_field(config, "project", str),
        round=_field(config, "round", int),
        planned_rounds=_field(config, "planned_rounds", int),
        model=_json_object(config, "model"),
        local_epochs=_field(config, "local_epochs", int),
        learning_rate=_optional_float(config, "learning_rate"),
        noise_multiplier=_optional_float(config, "noise_multiplier"),
        max_grad_norm=_optional_float(config, "max_grad_norm"),
        proximal_mu=float(_field(config, "proximal_mu", (int, float))),
        seed=_field(config, "seed", int),
        ledger_known=_field(config, "ledger_known", int),
        weights=_read_arrays(content, "global") if "global" in content else None,
        ledger_receipt=(
            _field(config, "ledger_receipt", str) or None if "ledger_receipt" in config else None
        ),
        secure_aggregation=_json_object(config, "secagg") if "secagg" in config else None,
    )


def secure_content(reply: SecureReply) -> RecordDict:
    records: dict[str, Any] = {
        "site": ConfigRecord(
            {
                "site_id": reply.site_id,
                "secagg": json.dumps(dict(reply.payload), sort_keys=True),
                "ledger_first_seq": reply.ledger_first_seq,
                "ledger_lines": list(reply.ledger_lines),
            }
        )
    }
    if reply.masked is not None:
        records["masked"] = _arrays({"masked": reply.masked})
    return RecordDict(records)


def read_secure(content: RecordDict) -> SecureReply:
    site = _record(content, "site", ConfigRecord)
    masked = None
    if "masked" in content:
        arrays = _read_arrays(content, "masked")
        vector = arrays.get("masked")
        if set(arrays) != {"masked"} or vector is None or vector.dtype != np.uint32:
            raise EnvelopeError("array record 'masked' does not hold one uint32 vector")
        masked = vector.reshape(-1)
    return SecureReply(
        site_id=_field(site, "site_id", str),
        payload=_json_object(site, "secagg"),
        masked=masked,
        ledger_first_seq=_field(site, "ledger_first_seq", int),
        ledger_lines=_lines(site),
    )


def reply_content(reply: RoundReply) -> RecordDict:
    return RecordDict(
        {
            "update": _arrays(reply.weights),
            "site": ConfigRecord(
                {
                    "site_id": reply.site_id,
                    "round": reply.round,
                    "ledger_first_seq": reply.ledger_first_seq,
                    "ledger_lines": list(reply.ledger_lines),
                }
            ),
        }
    )


def read_reply(content: RecordDict) -> RoundReply:
    site = _record(content, "site", ConfigRecord)
    return RoundReply(
        site_id=_field(site, "site_id", str),
        round=_field(site, "round", int),
        weights=_read_frozen_arrays(content, "update"),
        ledger_first_seq=_field(site, "ledger_first_seq", int),
        ledger_lines=_lines(site),
    )


def evaluation_content(reply: EvaluationReply) -> RecordDict:
    return RecordDict(
        {
            "site": ConfigRecord(
                {
                    "site_id": reply.site_id,
                    "ledger_first_seq": reply.ledger_first_seq,
                    "ledger_lines": list(reply.ledger_lines),
                }
            ),
        }
    )


def read_evaluation(content: RecordDict) -> EvaluationReply:
    site = _record(content, "site", ConfigRecord)
    return EvaluationReply(
        site_id=_field(site, "site_id", str),
        ledger_first_seq=_field(site, "ledger_first_seq", int),
        ledger_lines=_lines(site),
    )


def _lines(site: Mapping[str, Any]) -> tuple[str, ...]:
    lines = site.get("ledger_lines", [])
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise EnvelopeError("message field 'ledger_lines' is not a list of strings")
    return tuple(lines)


def init_content(reply: InitReply) -> RecordDict:
    return RecordDict(
        {
            "global": _arrays(reply.weights),
            "site": ConfigRecord(
                {"site_id": reply.site_id, "spec": json.dumps(dict(reply.spec), sort_keys=True)}
            ),
        }
    )


def read_init(content: RecordDict) -> InitReply:
    site = _record(content, "site", ConfigRecord)
    return InitReply(
        site_id=_field(site, "site_id", str),
        weights=_read_arrays(content, "global"),
        spec=_json_object(site, "spec"),
    )


def decline_error(error: MedfedError) -> Error:
    """The Flower error a site replies with when it refuses a round."""
    return Error(code=error.decline_code, reason=error.one_line())


def read_decline(error: Error) -> Decline:
    """What an error reply means: a medfed refusal, or a failure inside Flower or the app.

    A decline code this version does not know (a site of a newer medfed) is read from the
    ``error[code]`` the reason starts with.
    """
    reason = error.reason or ""
    raised = _RAISED.match(reason.strip())
    if raised:
        reason = raised.group(1)
    code = _CODE_NAMES.get(error.code)
    if code is None:
        match = _ONE_LINE.match(reason)
        code = match.group(1) if match else f"flower-{error.code}"
    first_line = reason.strip().splitlines()[-1] if reason.strip() else "(no reason given)"
    return Decline(code=code, reason=first_line[:500])
