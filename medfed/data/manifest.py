"""Site manifests: which patients a site has, where their image and label files are.

A manifest is a CSV file (header ``patient_id,image,label[,split]``) or a YAML file (a list of
mappings with the same keys, or ``{cases: [...]}``). Relative paths are taken from the
manifest's own directory so that a dataset folder can be moved as a whole.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from medfed.errors import DataError

Split = Literal["train", "val"]

REQUIRED_COLUMNS = ("patient_id", "image", "label")
OPTIONAL_COLUMNS = ("split",)
_SPLITS: dict[str, Split] = {"train": "train", "val": "val"}


@dataclass(frozen=True)
class Case:
    """One patient: the privacy unit. ``split`` is ``None`` when the manifest leaves it open."""

    patient_id: str
    image: Path
    label: Path
    split: Split | None = None


def load_manifest(path: Path | str) -> list[Case]:
    """Read a CSV or YAML manifest.

    Every structural problem (missing or unknown columns, empty fields, bad split values) is
    collected and reported together in one :class:`DataError`, each naming the file and the row.
    Whether the referenced files exist is not checked here; see
    :func:`medfed.data.validate.check_dataset`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"{path}: manifest not found",
            hint="set data.manifest in the site config to an existing CSV or YAML file",
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows, problems = _read_csv(path)
    elif suffix in (".yaml", ".yml"):
        rows, problems = _read_yaml(path)
    else:
        raise DataError(
            f"{path}: unknown manifest format {suffix or '(no suffix)'!r}",
            hint="use a .csv or .yaml manifest",
        )
    base = path.absolute().parent
    cases: list[Case] = []
    for where, row in rows:
        case = _parse_row(row, where=where, base=base, problems=problems)
        if case is not None:
            cases.append(case)
    if not problems and not cases:
        problems.append(f"{path}: no cases")
    if problems:
        count = len(problems)
        raise DataError(
            f"{count} problem{'s' if count != 1 else ''} in manifest:\n" + "\n".join(problems),
            hint="columns are patient_id, image, label and optionally split (train or val)",
        )
    return cases


def _read_csv(path: Path) -> tuple[list[tuple[str, Mapping[str, Any]]], list[str]]:
    problems: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = header
            problems += _column_problems(header, where=f"{path}:1")
            rows: list[tuple[str, Mapping[str, Any]]] = []
            for row in reader:
                if not any(
                    (value or "").strip() for value in row.values() if isinstance(value, str)
                ):
                    continue  # blank lines are harmless
                where = f"{path}:{reader.line_num}"
                if None in row:
                    problems.append(f"{where}: more fields than the header has columns")
                rows.append((where, row))
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a UTF-8 text file", hint="save the manifest as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}: not valid CSV ({exc})") from None
    return rows, problems


def _read_yaml(path: Path) -> tuple[list[tuple[str, Mapping[str, Any]]], list[str]]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"{path}:{where} not valid YAML", hint="fix the syntax there") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if isinstance(raw, Mapping) and set(raw) == {"cases"}:
        raw = raw["cases"]
    if not isinstance(raw, list):
        raise DataError(
            f"{path}: expected a list of cases (or a mapping with the single key 'cases')",
            hint="each case is a mapping with patient_id, image, label and optionally split",
        )
    problems: list[str] = []
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for number, item in enumerate(raw, start=1):
        where = f"{path}: case {number}"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: expected a mapping, got {type(item).__name__}")
            continue
        problems += _column_problems([str(key) for key in item], where=where)
        rows.append((where, item))
    return rows, problems


def _column_problems(columns: Sequence[str], *, where: str) -> list[str]:
    problems = []
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    unknown = [name for name in columns if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing:
        problems.append(f"{where}: missing column(s) {', '.join(missing)}")
    if unknown:
        names = ", ".join(name or "(unnamed)" for name in unknown)
        problems.append(f"{where}: unknown column(s) {names}")
    return problems


def _text(value: Any) -> str | None:
    """A scalar field as stripped text; ``None`` for containers."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value).strip()


def _parse_row(
    row: Mapping[str, Any], *, where: str, base: Path, problems: list[str]
) -> Case | None:
    fields: dict[str, str] = {}
    ok = True
    for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        if name not in row:
            continue  # already reported as a missing column
        text = _text(row[name])
        if text is None:
            problems.append(f"{where}: {name} must be a single value")
            ok = False
        elif not text and name in REQUIRED_COLUMNS:
            problems.append(f"{where}: empty {name}")
            ok = False
        else:
            fields[name] = text
    split_text = fields.get("split", "").lower()
    split = _SPLITS.get(split_text)
    if split_text and split is None:
        problems.append(f"{where}: split must be 'train', 'val' or empty, got {fields['split']!r}")
        ok = False
    if not ok or any(name not in fields for name in REQUIRED_COLUMNS):
        return None
    return Case(
        patient_id=fields["patient_id"],
        image=_resolve(base, fields["image"]),
        label=_resolve(base, fields["label"]),
        split=split,
    )


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    # normpath rather than resolve(): keep symlinked dataset folders as the user named them
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def split_cases(
    cases: Sequence[Case], *, val_fraction: float, seed: int
) -> tuple[list[Case], list[Case]]:
    """Divide ``cases`` into (train, val), each keeping manifest order.

    Explicit ``split`` values are honoured. The others are ranked by a hash of the seed and the
    patient id, so the split depends only on who is in the dataset, not on row order, and the
    lowest-ranked ``round(val_fraction * n)`` go to validation. There is always at least one
    training case, and at least one validation case when ``val_fraction > 0`` and there are two
    or more cases. Several rows of one patient always land on the same side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    explicit_val = {c.patient_id for c in cases if c.split == "val"}
    explicit_train = {c.patient_id for c in cases if c.split == "train"}
    both = sorted(explicit_val & explicit_train)
    if both:
        raise DataError(
            f"patients listed both as train and val: {', '.join(both)}",
            hint="one patient must be on one side of the split only",
        )
    open_ids = sorted(
        {c.patient_id for c in cases if c.split is None} - explicit_val - explicit_train,
        key=lambda pid: _rank(seed, pid),
    )
    n_total = len(open_ids) + len(explicit_val) + len(explicit_train)
    n_val = int(val_fraction * len(open_ids) + 0.5)
    if val_fraction > 0 and n_total >= 2 and not explicit_val:
        n_val = max(n_val, 1)
    if not explicit_train:
        n_val = min(n_val, len(open_ids) - 1)
    val_ids = explicit_val | set(open_ids[: max(n_val, 0)])
    train = [c for c in cases if c.patient_id not in val_ids]
    val = [c for c in cases if c.patient_id in val_ids]
    if not train:
        raise DataError(
            "no training cases after the split",
            hint="mark at least one case as split=train in the manifest",
        )
    return train, val


def _rank(seed: int, patient_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{patient_id}".encode()).digest()
