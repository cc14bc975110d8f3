"""`medfed data ...` commands: check a site's dataset, write a synthetic one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from medfed.errors import DataError

app = typer.Typer(help="Check site datasets and create synthetic ones.", no_args_is_help=True)


@app.command()
def check(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The site's site.yaml.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read every image and label of the site's manifest and list every problem found."""
    from medfed.config.loading import load_site_config
    from medfed.data.validate import CheckSettings, check_dataset

    site = load_site_config(config)
    # the checks a site runs before it trains, with the same settings: every file read anew
    report = check_dataset(manifest=site.data.manifest, settings=CheckSettings.of(site.data))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            typer.echo(problem.line())
        warnings = f", {report.n_warnings} warning(s)" if report.n_warnings else ""
        if report.ok:
            typer.echo(f"checked {report.n_cases} cases: no errors{warnings}")
        else:
            errors = len(report.problems) - report.n_warnings
            typer.echo(
                f"checked {report.n_cases} cases: {report.n_bad} bad, {errors} error(s){warnings}"
            )
    if not report.ok:
        raise typer.Exit(code=DataError.exit_code)


@app.command()
def synth(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to create.", show_default=False)
    ],
    cases: Annotated[int, typer.Option(min=3, help="Number of patients.")] = 24,
    size: Annotated[int, typer.Option(min=8, help="Volume edge length in voxels.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    site_shift: Annotated[
        float, typer.Option(help="Site difference: intensity, noise and lesion size and count.")
    ] = 0.0,
    dims: Annotated[int, typer.Option(min=2, max=3, help="2 (single slices) or 3.")] = 3,
    site_id: Annotated[
        str | None, typer.Option(help="Site id (default: the directory's name).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Regenerate into a non-empty directory.")
    ] = False,
    task: Annotated[
        Literal["shapes", "brain"],
        typer.Option(
            help="shapes: lesions in smooth bodies; brain: gray and white matter of nilearn's "
            "MNI152 template, deformed per patient (needs the brain extra; 3-D only)."
        ),
    ] = "shapes",
) -> None:
    """Write a synthetic site: NIfTI images and labels, manifest.csv and site.yaml."""
    from medfed.data.synth import synthesize_site

    result = synthesize_site(
        out=out,
        cases=cases,
        size=size,
        seed=seed,
        site_shift=site_shift,
        spatial_dims=dims,
        site_id=site_id,
        overwrite=force,
        task=task,
    )
    shape = "x".join([str(size)] * dims)
    typer.echo(
        f"wrote {len(result.patient_ids)} cases of about {shape} voxels for site "
        f"{result.site_id!r} ({result.n_train} train, {result.n_val} val) to {result.out}:"
    )
    for name in ("images/", "labels/", result.manifest.name, result.config.name):
        typer.echo(f"  {result.out}/{name}")
    typer.echo("next:")
    typer.echo(f"  medfed data check --config {result.config}")
    typer.echo(f"  medfed site train --config {result.config}")
