"""A site's cases screened before anything of them is used: every case checked, a bad one
refused (or, with ``data.bad_cases: exclude``, left out).

:func:`medfed.data.dataset.build_datasets` screens, so local training, a federated round and
an evaluation read only checked cases, and a bad case stops them before the privacy ledger is
touched: Poisson sampling would otherwise meet a defect in one run and miss it in the next.
A left-out case is a patient removed from the dataset, which is what add/remove adjacency
covers: the patient count the site releases is the count of the cases it keeps.

Each case's outcome is kept in ``checked.json`` in the site's cache, keyed by the check
settings and the identity of its two files (path, size, modification and change times,
inode), so that later rounds re-read only the files that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medfed.config.site import DataSection
from medfed.data.manifest import Case
from medfed.data.validate import CheckSettings, DataReport, Problem, check_case, check_dataset
from medfed.errors import DataError
from medfed.storage import make_private_dirs, read_json_object, replace_file

log = logging.getLogger("medfed.data")

CACHE_FILE = "checked.json"
PROBLEMS_FILE = "data-problems.txt"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Screened:
    """The cases that passed, the problems of those left out, and the warnings of the rest."""

    cases: tuple[Case, ...]
    excluded: tuple[Problem, ...]
    warnings: tuple[Problem, ...]


def problems_file(workdir: Path) -> Path:
    """Where the site keeps the last screen's problems: its own record, never sent or logged."""
    return workdir / PROBLEMS_FILE


def screen_cases(
    cases: Sequence[Case],
    *,
    data: DataSection,
    cache_dir: Path | None,
    problems_path: Path | None = None,
) -> Screened:
    """Check every case; raise :class:`DataError` for a bad one unless the site excludes them.

    The error is one line: how many cases fail and the first problem, naming its file. Every
    problem is also written to ``problems_path`` (mode 0600; removed when none is left), for
    a node whose logs must not name patient files.
    """
    settings = CheckSettings.of(data)
    cache = _CheckCache(cache_dir / CACHE_FILE if cache_dir is not None else None, settings)
    report = check_dataset(cases=cases, settings=settings, check=cache.check)
    cache.save()
    if problems_path is not None:
        _record_problems(problems_path, report)
    errors = [p for p in report.problems if p.severity == "error"]
    bad_ids = {p.patient_id for p in errors}
    if errors and data.bad_cases == "refuse":
        raise _refusal(report, errors, data.manifest)
    kept = tuple(case for case in cases if case.patient_id not in bad_ids)
    if not kept:
        raise DataError(
            f"{data.manifest}: every one of the {len(cases)} cases fails its check "
            f"(first: {errors[0].line()})",
            hint="run `medfed data check --config SITE.yaml` for the list of problems",
        )
    for problem in errors:
        log.warning("leaving out %s (data.bad_cases: exclude)", problem.line())
    warnings = tuple(
        p for p in report.problems if p.severity == "warning" and p.patient_id not in bad_ids
    )
    for problem in warnings:
        log.warning("%s", problem.line())
    return Screened(cases=kept, excluded=tuple(errors), warnings=warnings)


def _record_problems(path: Path, report: DataReport) -> None:
    try:
        if not report.problems:
            path.unlink(missing_ok=True)
            return
        make_private_dirs(path.parent)
        text = "".join(problem.line() + "\n" for problem in report.problems)
        replace_file(path, text.encode("utf-8"), mode=0o600)
    except OSError as exc:
        log.warning("cannot write the data problems file %s (%s)", path, exc.strerror)


def _refusal(report: DataReport, errors: list[Problem], manifest: Path) -> DataError:
    more = len(errors) - 1
    others = f"; {more} more problem{'s' if more != 1 else ''}" if more else ""
    return DataError(
        f"{report.n_bad} of {report.n_cases} cases in {manifest} fail their check: "
        f"{errors[0].line()}{others}",
        hint="nothing was trained or recorded; `medfed data check --config SITE.yaml` lists "
        "every problem; fix the cases, or set data.bad_cases: exclude to leave them out",
    )


class _CheckCache:
    """Per-case outcomes of :func:`check_case`, valid while the files and settings are."""

    def __init__(self, path: Path | None, settings: CheckSettings) -> None:
        self.path = path
        self.settings_key = json.dumps(asdict(settings), sort_keys=True)
        self._old: dict[str, Any] = {}
        self._new: dict[str, Any] = {}
        stored = read_json_object(path) if path is not None and path.is_file() else None
        if (
            stored is not None
            and stored.get("version") == _CACHE_VERSION
            and stored.get("settings") == self.settings_key
            and isinstance(stored.get("cases"), dict)
        ):
            self._old = stored["cases"]

    def check(self, case: Case, settings: CheckSettings) -> list[Problem]:
        key = _case_key(case)
        if key is None:  # a file cannot be stat'ed: check_case says which, nothing to cache
            return check_case(case, settings)
        found = _problems(self._old.get(key), case)
        if found is None:
            found = check_case(case, settings)
        self._new[key] = [
            {
                "path": None if p.path is None else str(p.path),
                "message": p.message,
                "severity": p.severity,
            }
            for p in found
        ]
        return found

    def save(self) -> None:
        if self.path is None or self._new == self._old:
            return
        record = {"version": _CACHE_VERSION, "settings": self.settings_key, "cases": self._new}
        try:
            make_private_dirs(self.path.parent)
            replace_file(self.path, json.dumps(record).encode("utf-8"), mode=0o600)
        except OSError as exc:
            # The cache saves time only: a site that cannot write it checks again next time.
            log.warning("cannot write the data check cache %s (%s)", self.path, exc.strerror)


def _case_key(case: Case) -> str | None:
    try:
        identity = [
            [str(path.absolute()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            for path, st in ((p, os.stat(p)) for p in (case.image, case.label))
        ]
    except OSError:
        return None
    text = json.dumps([case.patient_id, identity], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _problems(stored: Any, case: Case) -> list[Problem] | None:
    if not isinstance(stored, list):
        return None
    try:
        return [
            Problem(
                case.patient_id,
                None if item["path"] is None else Path(item["path"]),
                str(item["message"]),
                "warning" if item["severity"] == "warning" else "error",
            )
            for item in stored
        ]
    except (KeyError, TypeError):
        return None
