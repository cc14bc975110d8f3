"""Site configuration: pydantic models and YAML loading."""

from medfed.config.loading import dump_site_config, load_site_config
from medfed.config.site import (
    DataSection,
    ModelSection,
    PathsSection,
    PrivacySection,
    ReleaseSection,
    SiteConfig,
    TrainingSection,
    TransportSection,
)

__all__ = [
    "DataSection",
    "ModelSection",
    "PathsSection",
    "PrivacySection",
    "ReleaseSection",
    "SiteConfig",
    "TrainingSection",
    "TransportSection",
    "dump_site_config",
    "load_site_config",
]
