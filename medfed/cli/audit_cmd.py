"""`medfed audit ...` commands: verify a workspace's privacy record, and write the auditor's report.

``trace`` walks from a model (a directory or a registered version) back through the run's
chained round records to each site's commit entries, and exits like ``verify``.
``verify`` prints one line per finding (site, file, ledger line and seq, what is wrong), then
PASS or FAIL, and exits 0 only on PASS; on FAIL the last line on stderr is the audit error and
the exit code is :class:`~medfed.errors.AuditError`'s. ``report`` writes HTML, JSON or PDF:
``--format`` wins, otherwise the suffix of ``--out`` decides, and any other suffix is refused
before anything is read. The accounting libraries, MLflow, matplotlib and fpdf2 are imported
only when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Final, Literal

import typer

from medfed.cli import canary_cmd
from medfed.errors import AuditError, ConfigError

app = typer.Typer(
    help="Independent verification of ledgers, epsilons and budgets; the auditor's report.",
    no_args_is_help=True,
)

WorkspaceOption = Annotated[
    Path, typer.Option("--workspace", help="The aggregator's workspace (from `medfed provision`).")
]
RunOption = Annotated[
    str | None,
    typer.Option("--run", help="Check this run only (default: every run in the workspace)."),
]
LedgerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--ledger",
        help="SITE=PATH: a ledger a site handed over (its .head file next to it); repeatable.",
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (overrides the run's mlflow.json)."),
]
MlflowRunOption = Annotated[
    str | None,
    typer.Option("--mlflow-run", help="MLflow parent run id of the run (without mlflow.json)."),
]
Format = Literal["html", "json", "pdf"]


def parse_ledgers(values: list[str] | None, *, option: str = "--ledger") -> dict[str, Path]:
    """``SITE=PATH`` options as a mapping; ConfigError naming a malformed or repeated one."""
    found: dict[str, Path] = {}
    for value in values or []:
        site, sep, path = value.partition("=")
        if not sep or not site.strip() or not path.strip():
            raise ConfigError(
                f"{option} {value!r} is not SITE=PATH", hint=f"e.g. {option} site-a=ledger.jsonl"
            )
        if site.strip() in found:
            raise ConfigError(f"{option} gives site {site.strip()!r} twice")
        found[site.strip()] = Path(path.strip())
    return found


@app.command()
def verify(
    workspace: WorkspaceOption,
    run: RunOption = None,
    ledger: LedgerOption = None,
    tracking_uri: TrackingOption = None,
    mlflow_run: MlflowRunOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also list every check that passed.")
    ] = False,
) -> None:
    """Verify every site's ledger, recompute epsilon with two libraries, check the budgets."""
    from medfed.audit import verify_workspace

    result = verify_workspace(
        workspace=workspace,
        run_name=run,
        site_ledgers=parse_ledgers(ledger),
        tracking_uri=tracking_uri,
        mlflow_run=mlflow_run,
    )
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        for line in result.lines(verbose=verbose):
            typer.echo(line)
    if not result.passed:
        sites = sorted({f.site_id for f in result.findings if f.site_id})
        raise AuditError(
            f"{len(result.findings)} finding(s)"
            + (f" for site(s) {', '.join(sites)}" if sites else ""),
            hint="each FINDING line above names the site, the file and the entry; restore "
            "ledgers from backup, never edit them",
        )


@app.command()
def report(
    workspace: WorkspaceOption,
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the report (.html, .json or .pdf).")
    ],
    run: RunOption = None,
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format", help="html, json or pdf; wins over --out's suffix (default: the suffix)."
        ),
    ] = None,
    ledger: LedgerOption = None,
    tracking_uri: TrackingOption = None,
    mlflow_run: MlflowRunOption = None,
    canary: Annotated[
        list[Path] | None,
        typer.Option(
            "--canary",
            help="A `medfed audit canary` result file (WORKDIR/audit/canary-*.json); "
            "repeatable. Those beside a --ledger are read anyway.",
        ),
    ] = None,
) -> None:
    """Write the per-site privacy statement, its plots and the verification results."""
    from medfed.audit import build_report

    chosen: Format = fmt or format_of(out)
    if chosen == "pdf":
        from medfed.audit.pdf import pdf_available

        if not pdf_available():
            raise ConfigError(
                "a PDF report needs fpdf2, which is not installed",
                hint="pip install 'fpdf2>=2.8,<3' (or reinstall medfed), or use --format html",
            )
    built = build_report(
        workspace=workspace,
        run_name=run,
        site_ledgers=parse_ledgers(ledger),
        tracking_uri=tracking_uri,
        mlflow_run=mlflow_run,
        canary_results=canary or [],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if chosen == "pdf":
        built.write_pdf(out)
    elif chosen == "json":
        out.write_text(built.to_json_text(), encoding="utf-8")
    else:
        out.write_text(built.to_html(), encoding="utf-8")
    result = built.verification
    typer.echo(
        f"{chosen} report written to {out}: {len(built.sites)} site(s); verification "
        f"{result.verdict} ({len(result.findings)} finding(s))"
    )


@app.command("trace")
def trace(
    workspace: WorkspaceOption,
    model_version: Annotated[
        str | None,
        typer.Option("--model-version", help="NAME/VERSION of a registered model to trace."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="A model directory (model.safetensors + model.json)."),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option("--run", help="The run a --model directory claims (default: its record's)."),
    ] = None,
    site_ledger: Annotated[
        list[str] | None,
        typer.Option(
            "--site-ledger",
            help="SITE=PATH: a ledger the site handed over (wins over the aggregator's copy).",
        ),
    ] = None,
    tracking_uri: TrackingOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Walk from a model to every round, site update and ledger entry behind it."""
    from medfed.audit.trace import trace_model

    result = trace_model(
        workspace=workspace,
        model=model,
        model_version=model_version,
        run_name=run,
        site_ledgers=parse_ledgers(site_ledger, option="--site-ledger"),
        tracking_uri=tracking_uri,
    )
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        for line in result.lines():
            typer.echo(line)
    if not result.passed:
        raise AuditError(
            f"{len(result.findings)} broken link(s) between {result.model} and its ledgers",
            hint="each FINDING line names the round, the site and what differs",
        )


SUFFIXES: Final[dict[str, Format]] = {
    ".html": "html",
    ".htm": "html",
    ".json": "json",
    ".pdf": "pdf",
}


def format_of(out: Path) -> Format:
    """The report format ``out``'s suffix names; ConfigError for any other suffix."""
    found = SUFFIXES.get(out.suffix.lower())
    if found is None:
        what = f"suffix {out.suffix!r}" if out.suffix else "no suffix"
        *others, last = SUFFIXES
        raise ConfigError(
            f"--out {out} has {what}: the report is written as {', '.join(others)} or {last} only",
            hint="name the file with one of those suffixes, or give --format html|json|pdf",
        )
    return found


app.command("canary")(canary_cmd.canary)
