"""The final global model in MLflow: logged with ``mlflow.pytorch`` and registered with its
privacy guarantee as model version tags.

The aggregator's checkpoint (``model.safetensors`` + ``model.json``) is loaded into the plain
MONAI network (never an Opacus wrapper) and logged as ``pt2`` (``torch.export``: loading it needs
torch only), traced with an input example of batch size 2 so that the batch dimension stays
dynamic, with a signature inferred from that example and an explicit ``pip_requirements`` list;
a network torch cannot export is logged pickled instead. Where MONAI is not installed (the
aggregator extra has none) the checkpoint directory is logged as plain artifacts and the run
says so in its ``medfed.model_format`` tag; the version is registered either way.

Registered as ``medfed-<run_name>``; the version's tags are the guarantee: ``medfed.epsilon.<site>``
and ``medfed.delta.<site>`` (each site's whole ledger spend, an upper bound for this model),
``medfed.accountant.<site>`` (the accountant the site's ledger names), ``medfed.accountant``
(the sites' accountants), ``medfed.privacy_unit`` = ``patient``, ``medfed.sites`` (with
``medfed.site_count`` and ``medfed.sites_sha256``), ``medfed.rounds``, ``medfed.run_name``;
and the trace: ``medfed.model_sha256`` (the weights' digest) and ``medfed.trace_head`` (the
hash of the final round record). The UI shows only a few tags without scrolling, so the
version's description states the guarantee too, one line per site
(:func:`medfed.tracking.descriptions.model_version_description`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.model_files import read_model
from medfed.privacy.events import PRIVACY_UNIT, canonical_json
from medfed.tracking.descriptions import model_version_description
from medfed.tracking.operations import sites_tags
from medfed.types import weights_digest

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

log = logging.getLogger("medfed.tracking")

MODEL_NAME = "model"
DEFAULT_PATCH_EDGE = 32
FORMAT_TAG = "medfed.model_format"
MODEL_SHA256_TAG = "medfed.model_sha256"
TRACE_HEAD_TAG = "medfed.trace_head"
# mlflow.utils.validation.MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH is 100,000: a version's
# ``medfed.sites`` names thousands of sites; past this it is a count and digest, and
# ``medfed.epsilon.<site>`` names each site still.
MAX_VERSION_SITES_LENGTH = 90_000


@dataclass(frozen=True)
class RegisteredVersion:
    """The registered model version of a run's final model."""

    name: str
    version: str
    source: str
    model_format: str  # "pt2", "pickle" or "medfed-checkpoint"


def registered_model_name(run_name: str) -> str:
    return f"medfed-{run_name}"


def privacy_tags(*, summary: Mapping[str, Any], run_name: str) -> dict[str, str]:
    """The model version tags stating the guarantee, from a run summary.

    The sites are those of the run with a privacy budget (every site whose update was ever
    aggregated sent signed ledger entries); epsilon is each site's whole ledger spend.
    """
    budgets = dict(summary.get("budgets") or {})
    per_site = dict(budgets.get("sites") or {})
    run_sites = [str(s.get("site_id")) for s in summary.get("sites") or []]
    sites = sorted(s for s in run_sites if s in per_site)
    accountants = sorted({str(dict(per_site[s]).get("accountant", "unknown")) for s in sites})
    tags = {
        "medfed.run_name": run_name,
        "medfed.privacy_unit": PRIVACY_UNIT,
        "medfed.accountant": ",".join(accountants) or "unknown",
        **sites_tags(sites, limit=MAX_VERSION_SITES_LENGTH),
        "medfed.rounds": str(summary.get("rounds_completed", "")),
        "medfed.secure_aggregation": _flag(summary.get("secure_aggregation")),
        "medfed.distributed_noise": _distributed(summary.get("distributed_noise")),
    }
    for site in sites:
        budget = dict(per_site[site])
        spent = budget.get("epsilon_spent")
        tags[f"medfed.epsilon.{site}"] = "inf" if spent is None else repr(float(spent))
        if budget.get("budget_view") is not None:
            # distributed noise: both guarantees, and the one the cap holds on
            tags[f"medfed.epsilon_view.{site}"] = str(budget["budget_view"])
            for view in ("distributed", "local"):
                value = budget.get(f"epsilon_{view}")
                tags[f"medfed.epsilon_{view}.{site}"] = (
                    "inf" if value is None else repr(float(value))
                )
        tags[f"medfed.delta.{site}"] = repr(float(budget.get("delta", float("nan"))))
        tags[f"medfed.accountant.{site}"] = str(budget.get("accountant", "unknown"))
        if budget.get("epsilon_cap") is not None:
            tags[f"medfed.epsilon_cap.{site}"] = repr(float(budget["epsilon_cap"]))
    site_level = summary.get("site_level_privacy")
    if isinstance(site_level, Mapping):
        # central DP: its unit is a whole site, so it is named apart from the patient-level tags
        spent = site_level.get("site_level_epsilon")
        tags["medfed.site_level_epsilon"] = "inf" if spent is None else repr(float(spent))
        tags["medfed.site_level_delta"] = repr(float(site_level.get("delta", float("nan"))))
    return tags


def _distributed(value: object) -> str:
    """Distributed noise as a tag: "false", or the shares the sites counted on ("3 sites")."""
    if isinstance(value, Mapping):
        return f"{value.get('sites')} sites"
    return "false"


def _flag(value: object) -> str:
    """A yes/no setting as a tag: "true", "false", or "unknown" where a summary predates it."""
    return "unknown" if value is None else str(bool(value)).lower()


def trace_tags(*, checkpoint: Path) -> dict[str, str]:
    """The tags that bind a version to its weights and to the run's chain of round records.

    ``medfed.model_sha256`` is the :func:`medfed.types.weights_digest` of the checkpoint's
    weights; ``medfed.trace_head`` the SHA-256 of its round record (the chain's head), which
    ``medfed audit trace`` walks back from.
    """
    stored = read_model(checkpoint)
    tags = {MODEL_SHA256_TAG: weights_digest(stored.weights)}
    ema = stored.metadata.get("ema")
    if "previous_record_sha256" in stored.metadata:
        tags[TRACE_HEAD_TAG] = hashlib.sha256(canonical_json(stored.metadata)).hexdigest()
    elif isinstance(ema, Mapping) and isinstance(ema.get("trace_head"), str):
        # a moving average of the rounds' models (medfed.model_average): the last one's record
        tags[TRACE_HEAD_TAG] = ema["trace_head"]
    return tags


def example_patch(*, spatial_dims: int, downsampling: int) -> tuple[int, ...]:
    """32 per spatial dimension, rounded up to a multiple of the network's down-sampling."""
    edge = -(-DEFAULT_PATCH_EDGE // downsampling) * downsampling
    return (edge,) * spatial_dims


def log_final_model(
    *,
    client: MlflowClient,
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    checkpoint: Path,
    summary: Mapping[str, Any],
    run_name: str,
    patch: Sequence[int] | None = None,
    retry: bool = False,
) -> RegisteredVersion:
    """Log ``checkpoint`` on run ``run_id`` and register it with the run's privacy tags.

    ``retry``: an earlier attempt may have registered a version already; reuse it then.
    """
    # MLflow resolves a ``models:/`` source and logs models through the process-wide URI.
    with _global_tracking_uri(tracking_uri):
        return _log_and_register(
            client=client,
            experiment_id=experiment_id,
            run_id=run_id,
            checkpoint=checkpoint,
            summary=summary,
            run_name=run_name,
            patch=patch,
            retry=retry,
        )


def _log_and_register(
    *,
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    checkpoint: Path,
    summary: Mapping[str, Any],
    run_name: str,
    patch: Sequence[int] | None,
    retry: bool,
) -> RegisteredVersion:
    name = registered_model_name(run_name)
    if retry:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if found:
            version = found[0]
            return RegisteredVersion(
                name=name,
                version=str(version.version),
                source=str(version.source),
                model_format=str(client.get_run(run_id).data.tags.get(FORMAT_TAG, "")),
            )
    network = _plain_network(Path(checkpoint))
    model_id: str | None = None
    if network is None:
        client.log_artifacts(run_id, str(checkpoint), MODEL_NAME)
        source, model_format = f"runs:/{run_id}/{MODEL_NAME}", "medfed-checkpoint"
        client.set_tag(
            run_id,
            FORMAT_TAG,
            "medfed-checkpoint (MONAI is not installed where the aggregator runs: the weights "
            "are logged as files, load them with medfed.models.load_checkpoint)",
        )
    else:
        module, spatial_dims, downsampling = network
        shape = (
            tuple(patch)
            if patch
            else example_patch(spatial_dims=spatial_dims, downsampling=downsampling)
        )
        model_id, model_format = _log_pytorch(
            client=client,
            experiment_id=experiment_id,
            run_id=run_id,
            module=module,
            patch=shape,
        )
        source = f"models:/{model_id}"
        client.set_tag(run_id, FORMAT_TAG, f"mlflow.pytorch ({model_format})")
    tags = {
        **privacy_tags(summary=summary, run_name=run_name),
        **trace_tags(checkpoint=Path(checkpoint)),
    }
    _ensure_registered_model(client, name=name, run_name=run_name)
    version = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags=tags,
        description=model_version_description(summary=summary, run_name=run_name),
        await_creation_for=0,
        model_id=model_id,
    )
    client.set_tag(run_id, "medfed.model_version", f"{name}/{version.version}")
    return RegisteredVersion(
        name=name, version=str(version.version), source=source, model_format=model_format
    )


def _plain_network(checkpoint: Path) -> tuple[nn.Module, int, int] | None:
    """The checkpoint in a freshly built plain network; None when MONAI is not installed."""
    try:
        import monai  # noqa: F401
    except ImportError:
        log.info("MONAI is not installed: the final model is logged as checkpoint files")
        return None
    from medfed.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(path=checkpoint)
    return loaded.model.eval(), loaded.spec.spatial_dims, loaded.spec.downsampling


def _log_pytorch(
    *,
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    module: nn.Module,
    patch: tuple[int, ...],
) -> tuple[str, str]:
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    in_channels = _in_channels(module)
    example = np.random.default_rng(0).standard_normal((2, in_channels, *patch)).astype(np.float32)
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    torch_version = torch.__version__.split("+")[0]
    last_error: Exception | None = None
    for model_format in ("pt2", "pickle"):
        requirements = [f"torch=={torch_version}"]
        if model_format == "pickle":  # unpickling needs the network's classes
            import monai

            requirements.append(f"monai=={monai.__version__}")
        logged = client.create_logged_model(
            experiment_id=experiment_id, name=MODEL_NAME, source_run_id=run_id
        )
        try:
            mlflow.pytorch.log_model(
                module,
                name=MODEL_NAME,
                run_id=run_id,
                model_id=logged.model_id,
                input_example=example,
                signature=signature,
                pip_requirements=requirements,
                serialization_format=model_format,
                await_registration_for=0,
            )
        except MlflowException:
            raise  # the store: the caller's buffer retries
        except Exception as exc:  # torch.export cannot trace every network
            log.warning("cannot log the model as %s (%s); trying another way", model_format, exc)
            last_error = exc
            continue
        return str(logged.model_id), model_format
    assert last_error is not None
    raise last_error


def _in_channels(module: nn.Module) -> int:
    from torch import nn

    for layer in module.modules():
        if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return int(layer.in_channels)
    return 1


def _ensure_registered_model(client: MlflowClient, *, name: str, run_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name,
            tags={"medfed.run_name": run_name, "medfed.privacy_unit": PRIVACY_UNIT},
            description=f"Global models of medfed federation run {run_name!r}.",
        )
    except MlflowException as exc:  # registered by another process in between
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """``mlflow.pytorch.log_model`` reads the process-wide tracking URI: set it, then restore.

    (No active run is started: the run id is passed explicitly.)
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_global = utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_global
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
