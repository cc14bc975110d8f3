"""The site's privacy ledger as its config places it: file, signing key and head witness."""

from __future__ import annotations

from medfed.config.site import SiteConfig
from medfed.privacy.site_ledger import SiteLedger


def ledger_of(config: SiteConfig) -> SiteLedger:
    """The ledger every site command reads and writes (one construction, one set of paths)."""
    return SiteLedger(
        path=config.ledger_path,
        key_path=config.signing_key_path,
        site_id=config.site_id,
        witness=config.paths.head_witness,
    )
