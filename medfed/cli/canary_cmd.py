"""`medfed audit canary`: a one-run empirical privacy audit of a site's DP-SGD path.

The command trains once on synthetic canary patients only (never on patient data, never on
the site's ledger or budget) and exits with :class:`~medfed.errors.PrivacyAuditViolation`'s
code when the audit proves more privacy loss than the run's own ledger claims. Torch, MONAI and
Opacus are imported only when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medfed.errors import PrivacyAuditViolation
from medfed.site.canary_options import (
    DEFAULT_CANARIES,
    DEFAULT_CONFIDENCE,
    DEFAULT_EPSILON,
    ScoreKind,
)


def canary(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The site's configuration file (site.yaml).")
    ],
    canaries: Annotated[
        int,
        typer.Option(
            "--canaries", min=1, help="Canary patients, each trained with probability 1/2."
        ),
    ] = DEFAULT_CANARIES,
    epsilon: Annotated[
        float,
        typer.Option(
            "--epsilon", help="The audit run's own claim: its noise is planned for this epsilon."
        ),
    ] = DEFAULT_EPSILON,
    confidence: Annotated[
        float, typer.Option("--confidence", help="Confidence of the lower bound.")
    ] = DEFAULT_CONFIDENCE,
    score: Annotated[
        ScoreKind,
        typer.Option(
            "--score",
            help="gradient: white-box Dirac gradient canaries, read from every noisy update; "
            "loss: black-box, each canary's loss drop (weaker).",
        ),
    ] = "gradient",
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the result to this file as JSON."),
    ] = None,
) -> None:
    """Audit the site's DP-SGD empirically in one run (Steinke, Nasr, Jagielski 2023).

    Canary-only: the run trains on synthetic canary patients generated at the site in its own
    image geometry, never reads patient data and never touches the site's privacy ledger or
    budget; it keeps a throw-away ledger under WORKDIR/audit/, from which the claimed epsilon
    is computed. Exits 0 when the empirical lower bound stays at or below that claim, and 21
    (privacy-audit-violated) when it exceeds it.
    """
    from medfed.config import load_site_config
    from medfed.site.canary_audit import run_canary_audit, write_result

    site = load_site_config(config)
    result = run_canary_audit(
        config=site, canaries=canaries, epsilon=epsilon, confidence=confidence, score=score
    )
    document = result.to_json()
    if json_path is not None:
        write_result(json_path, document)
    bound = result.bound
    typer.echo(
        f"site {result.site_id}: canary audit {result.run_id} ({result.score} score, "
        f"{bound.canaries} canaries, {result.included} trained)"
    )
    typer.echo(
        f"claimed epsilon {result.claimed_epsilon:.3f} (delta {bound.delta:g}, "
        f"{result.accountant}, from the audit run's own ledger)"
    )
    typer.echo(
        f"empirical lower bound {bound.epsilon:.3f} at confidence {bound.confidence:g} "
        f"({bound.correct} of {bound.guesses} guesses right)"
    )
    typer.echo(f"violated: {json.dumps(result.violated)}")
    typer.echo(f"result: {result.result_file}")
    if result.violated:
        raise PrivacyAuditViolation(
            f"site {result.site_id}: the canary audit proves epsilon above {bound.epsilon:.3f} "
            f"at confidence {bound.confidence:g}, but the run's ledger claims "
            f"{result.claimed_epsilon:.3f}",
        )
