"""``medfed audit trace``: from a model back to every round, site update and ledger entry behind it.

The aggregator stores a record beside each round's global model (the model's metadata, see
:func:`medfed.aggregator.run_store.round_record`): the digest of the model the round started
from and of the one it made, and per site the digest of the update it received, the ledger
seqs that came with it and the seq of the round's commit entry; each record names the SHA-256
of the record before it (canonical JSON), from round 0, the initial model, on. Each site's
commit entry names the digests of the model it trained from and of the update it sent.

The trace checks every link: the model's weights against the final record, each record against
its own weights and the record before it, and each site's update against a commit entry of its
verified ledger (the site's own, when handed over, or the aggregator's copy), at the recorded
seq. Every broken link is a finding naming the round and site. Each site's epsilon is
recomputed from its ledger up to the last entry the chain uses, at the site's own accountant
and delta. Only numpy and safetensors (through :mod:`medfed.model_files`) read the weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.audit.accounting import recompute
from medfed.audit.mlflow_store import MlflowStore, mlflow_missing
from medfed.audit.trace_result import SiteSpend, TraceFinding, TraceResult, as_mapping, short
from medfed.errors import ConfigError, LedgerError, ModelError
from medfed.model_average import stored_average
from medfed.model_files import read_model
from medfed.privacy.accounting import compute_epsilon
from medfed.privacy.events import GENESIS_HASH, CommitEntry, ReserveEntry, canonical_json
from medfed.privacy.ledger import LedgerReport, verify_ledger, verify_ledger_bytes
from medfed.storage import read_bytes, read_json_object
from medfed.tracking.model_log import MODEL_SHA256_TAG, TRACE_HEAD_TAG
from medfed.types import weights_digest
from medfed.workspace import RunPaths, Workspace, load_workspace

__all__ = ["SiteSpend", "TraceFinding", "TraceResult", "record_sha256", "trace_model"]

RECORD_FIELDS = ("round", "run_name", "previous_record_sha256", "global_sha256", "updates")


@dataclass(kw_only=True)
class _Walk:
    """What the trace has found so far (the result is built from it at the end)."""

    model: str
    run_name: str
    model_sha256: str | None
    claimed_head: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    spends: list[SiteSpend] = field(default_factory=list)
    findings: list[TraceFinding] = field(default_factory=list)

    def found(self, problem: str, *, round: int | None = None, site: str | None = None) -> None:
        self.findings.append(TraceFinding(problem=problem, round=round, site_id=site))


def record_sha256(record: Mapping[str, Any]) -> str:
    """SHA-256 of a round record's canonical JSON (what the next record names it by)."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def trace_model(
    *,
    workspace: Path,
    model: Path | None = None,
    model_version: str | None = None,
    run_name: str | None = None,
    site_ledgers: Mapping[str, Path] | None = None,
    tracking_uri: str | None = None,
) -> TraceResult:
    """Trace a model directory or a registered ``NAME/VERSION`` through its run's records.

    ``run_name`` names the run a model directory claims to come from (default: its record's).
    Raises ConfigError for what the auditor must fix to start (no such workspace, run, model
    or version); every link that does not hold is a finding of the result.
    """
    if (model is None) == (model_version is None):
        raise ConfigError(
            "trace needs exactly one of --model DIR and --model-version NAME/VERSION",
            hint="e.g. --model-version medfed-study/1",
        )
    ws = load_workspace(Path(workspace))
    given = {str(site): Path(path) for site, path in (site_ledgers or {}).items()}
    unknown = sorted(set(given) - {entry.site_id for entry in ws.manifest.sites})
    if unknown:
        raise ConfigError(
            f"--site-ledger names sites the workspace does not register: {', '.join(unknown)}"
        )
    if model is not None:
        result = _from_directory(ws, Path(model), run_name)
    else:
        assert model_version is not None
        result = _from_version(ws, model_version, tracking_uri)
    records = _walk_rounds(ws, result)
    head = None
    if records:
        final = records[-1]
        head = record_sha256(final)
        if result.claimed_head is not None and result.claimed_head != head:
            result.found(
                f"the version's {TRACE_HEAD_TAG} {short(result.claimed_head)} is not the head "
                f"{short(head)} of run {result.run_name!r}'s chain",
                round=final["round"],
            )
        if result.model_sha256 != final.get("global_sha256") and not _is_run_average(
            ws, result, final
        ):
            result.found(_model_mismatch(result, records), round=final["round"])
    _check_ledgers(ws, result, records, given)
    return TraceResult(
        model=result.model,
        run_name=result.run_name,
        model_sha256=result.model_sha256,
        head=head,
        rounds=tuple(result.rounds),
        spends=tuple(result.spends),
        findings=tuple(result.findings),
    )


def _from_directory(ws: Workspace, directory: Path, run_name: str | None) -> _Walk:
    stored = read_model(directory)
    named = stored.metadata.get("run_name")
    run = run_name or (named if isinstance(named, str) else None)
    if run is None:
        raise ConfigError(
            f"{directory}: the model names no run (its metadata holds no round record)",
            hint="give the run it claims to come from with --run NAME",
        )
    return _Walk(model=str(directory), run_name=run, model_sha256=weights_digest(stored.weights))


def _from_version(ws: Workspace, name_version: str, tracking_uri: str | None) -> _Walk:
    name, sep, version = name_version.rpartition("/")
    if not sep or not name or not version:
        raise ConfigError(
            f"--model-version {name_version!r} is not NAME/VERSION", hint="e.g. medfed-study/1"
        )
    uri = tracking_uri or f"sqlite:///{ws.layout.mlflow_db.absolute()}"
    missing = mlflow_missing()
    if missing is not None:
        raise ConfigError(f"cannot read {name_version}: {missing}")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ConfigError(
            f"no MLflow store at {uri}", hint="give the store that holds it with --tracking-uri"
        )
    found = [v for v in MlflowStore(tracking_uri=uri).model_versions(name) if v.version == version]
    if not found:
        raise ConfigError(f"no model version {name_version} in the MLflow store {uri}")
    entry = found[0]
    run = entry.tags.get("medfed.run_name")
    if not run:
        raise ConfigError(f"model version {name_version} names no run (no medfed.run_name tag)")
    result = _Walk(
        model=f"models:/{name_version}",
        run_name=run,
        model_sha256=entry.tags.get(MODEL_SHA256_TAG),
        claimed_head=entry.tags.get(TRACE_HEAD_TAG),
    )
    for tag, value in (
        (MODEL_SHA256_TAG, result.model_sha256),
        (TRACE_HEAD_TAG, result.claimed_head),
    ):
        if value is None:
            result.found(f"model version {name_version} has no {tag} tag")
    info = read_json_object(_run_paths(ws, run).mlflow_info) or {}
    parent = info.get("parent_run_id")
    if isinstance(parent, str) and entry.run_id != parent:
        result.found(
            f"model version {name_version} was logged on MLflow run {entry.run_id}, not on run "
            f"{run!r}'s parent run {parent}: it was registered from another run"
        )
    return result


def _walk_rounds(ws: Workspace, result: _Walk) -> list[dict[str, Any]]:
    """Every round record of the run, each checked against its weights and the one before."""
    paths = _run_paths(ws, result.run_name)
    found = sorted(paths.global_models.glob("round-*")) if paths.global_models.is_dir() else []
    records: list[dict[str, Any]] = []
    for index, directory in enumerate(found):
        if directory.name != f"round-{index:04d}":
            result.found(f"{directory.name} where round-{index:04d} was expected", round=index)
            break
        try:
            stored = read_model(directory)
        except ModelError as exc:
            result.found(exc.message, round=index)
            break
        record = dict(stored.metadata)
        absent = [name for name in RECORD_FIELDS if name not in record]
        if absent:
            result.found(f"no round record ({', '.join(absent)} missing)", round=index)
            break
        _check_record(result, index, record, records[-1] if records else None)
        digest = weights_digest(stored.weights)
        if digest != record["global_sha256"]:
            result.found(
                f"the stored global model's weights are {short(digest)}, its record says "
                f"{short(record['global_sha256'])}",
                round=index,
            )
        records.append(record)
        result.rounds.append(record)
    if not records:
        result.found(f"run {result.run_name!r} has no global model with a round record")
    return records


def _run_paths(ws: Workspace, run: str) -> RunPaths:
    paths = ws.layout.run(run)
    if Path(run).name != run or not paths.directory.is_dir():
        known = ", ".join(ws.layout.run_names()) or "none"
        raise ConfigError(f"no run {run!r} in {ws.layout.runs}", hint=f"runs: {known}")
    return paths


def _check_record(
    result: _Walk, index: int, record: Mapping[str, Any], previous: Mapping[str, Any] | None
) -> None:
    if record["round"] != index or record["run_name"] != result.run_name:
        result.found(
            f"the record names run {record['run_name']!r} round {record['round']}", round=index
        )
    want_previous = GENESIS_HASH if previous is None else record_sha256(previous)
    if record["previous_record_sha256"] != want_previous:
        result.found(
            f"the record's previous-record hash {short(record['previous_record_sha256'])} is "
            f"not {short(want_previous)}, the hash of round {index - 1}'s record",
            round=index,
        )
    want_start = None if previous is None else previous.get("global_sha256")
    if record.get("start_sha256") != want_start:
        result.found(
            f"the round started from {short(record.get('start_sha256'))}, not from round "
            f"{index - 1}'s global model {short(want_start)}",
            round=index,
        )


def _is_run_average(ws: Workspace, result: _Walk, final: Mapping[str, Any]) -> bool:
    """Whether the model is the run's moving average of its rounds' models (``ema``), rebuilt
    here from the round models the chain vouches for, up to the final one."""
    found = stored_average(_run_paths(ws, result.run_name))
    if found is None:
        return False
    average, stored_digest = found
    records = {record["round"]: record for record in result.rounds}
    return (
        stored_digest == weights_digest(average.weights()) == result.model_sha256
        and average.rounds[-1] == final["round"]
        and all(
            records.get(index, {}).get("global_sha256") == digest
            for index, digest in zip(average.rounds, average.digests, strict=True)
        )
    )


def _model_mismatch(result: _Walk, records: list[dict[str, Any]]) -> str:
    final = records[-1]
    same = [r["round"] for r in records if r.get("global_sha256") == result.model_sha256]
    which = f"it is round {same[-1]}'s global model" if same else "no round made it"
    return (
        f"the model's weights digest {short(result.model_sha256)} is not the final global "
        f"model {short(final.get('global_sha256'))} of run {result.run_name!r}: {which}"
    )


@dataclass
class _SiteLedger:
    source: str
    data: bytes
    report: LedgerReport
    last_seq: int = -1


def _check_ledgers(
    ws: Workspace,
    result: _Walk,
    records: list[dict[str, Any]],
    given: Mapping[str, Path],
) -> None:
    ledgers: dict[str, _SiteLedger | None] = {}
    for record in records:
        index = record["round"]
        for site, item in sorted(as_mapping(record["updates"]).items()):
            if site not in ledgers:
                ledgers[site] = _open_ledger(ws, result, site, given.get(site))
            ledger = ledgers[site]
            if ledger is not None:
                _check_update(result, index, site, record, as_mapping(item), ledger)
    for site, ledger in sorted(ledgers.items()):
        if ledger is not None and ledger.last_seq >= 0:
            result.spends.append(_spend(ws, site, ledger))


def _open_ledger(ws: Workspace, result: _Walk, site: str, given: Path | None) -> _SiteLedger | None:
    try:
        public_key = ws.ledger_public_key(site)
    except ConfigError as exc:
        result.found(exc.message, site=site)
        return None
    path = given or ws.layout.ledger_copy(site)
    source = str(path) if given else str(path.relative_to(ws.root))
    try:
        data = read_bytes(path)
        if given is not None:
            report = verify_ledger(path, public_key=public_key, site_id=site)
        else:
            report = verify_ledger_bytes(data, public_key=public_key, site_id=site, source=source)
    except LedgerError as exc:
        result.found(f"the ledger does not verify: {exc.message}", site=site)
        return None
    return _SiteLedger(source=source, data=data, report=report)


def _check_update(
    result: _Walk,
    index: int,
    site: str,
    record: Mapping[str, Any],
    item: Mapping[str, Any],
    ledger: _SiteLedger,
) -> None:
    entries = ledger.report.entries
    seq, last = item.get("commit_seq"), item.get("ledger_last_seq")
    if not isinstance(seq, int) or not 0 <= seq < len(entries):
        result.found(
            f"the record's commit seq {seq!r} is not in {ledger.source} ({len(entries)} entries)",
            round=index,
            site=site,
        )
        return
    if isinstance(last, int):
        if last >= len(entries):
            result.found(
                f"the record accepted ledger seqs up to {last} but {ledger.source} ends at seq "
                f"{len(entries) - 1}",
                round=index,
                site=site,
            )
        ledger.last_seq = max(ledger.last_seq, min(last, len(entries) - 1))
    ledger.last_seq = max(ledger.last_seq, seq)
    commit = entries[seq]
    reserve = entries[commit.reservation_seq] if isinstance(commit, CommitEntry) else None
    if not isinstance(commit, CommitEntry) or not isinstance(reserve, ReserveEntry):
        result.found(f"seq {seq} of {ledger.source} is no commit entry", round=index, site=site)
        return
    if (reserve.run_id, reserve.round) != (result.run_name, index):
        result.found(
            f"the commit at seq {seq} of {ledger.source} is of run {reserve.run_id!r} round "
            f"{reserve.round}",
            round=index,
            site=site,
        )
    for what, named, wanted in (
        ("model_sha256", commit.model_sha256, record.get("start_sha256")),
        ("update_sha256", commit.update_sha256, item.get("update_sha256")),
    ):
        if named != wanted:
            result.found(
                f"the commit at seq {seq} of {ledger.source} has {what} {short(named)} where "
                f"the round record has {short(wanted)}",
                round=index,
                site=site,
            )


def _spend(ws: Workspace, site: str, ledger: _SiteLedger) -> SiteSpend:
    """Epsilon of the ledger's first entries, through the last one the chain uses."""
    lines = ledger.data.split(b"\n")[: ledger.last_seq + 1]
    public_key = ws.ledger_public_key(site)
    upto = verify_ledger_bytes(
        b"".join(line + b"\n" for line in lines),
        public_key=public_key,
        site_id=site,
        source=ledger.source,
    )
    terms = upto.terms
    delta = terms.delta if terms is not None else upto.legacy_delta
    # the chain used a commit, so a reservation: format 2 has terms before it, format 1 a delta
    assert delta is not None
    accountant = terms.accountant if terms is not None else "rdp"
    return SiteSpend(
        site_id=site,
        ledger=ledger.source,
        last_seq=ledger.last_seq,
        accountant=accountant,
        delta=delta,
        epsilon=compute_epsilon(history=upto.history, delta=delta, accountant=accountant),
        epsilons=recompute(history=upto.history, delta=delta).to_json(),
    )
