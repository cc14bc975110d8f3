"""The site's privacy ledger as its config places it: file, signing key, head witness and the
aggregator's receipt key."""

from __future__ import annotations

from medfed.config.site import SiteConfig
from medfed.errors import ConfigError, LedgerError
from medfed.privacy.keys import load_public_key
from medfed.privacy.site_ledger import SiteLedger


def ledger_of(config: SiteConfig) -> SiteLedger:
    """The ledger every site command reads and writes (one construction, one set of paths)."""
    receipt_key = None
    path = config.receipt_key_path
    if path is not None:
        try:
            receipt_key = load_public_key(path)
        except LedgerError as exc:
            raise ConfigError(
                f"transport.receipt_public_key: {exc.message}",
                hint="use the aggregator_receipt.pub of the site's kit (from `medfed provision`)",
            ) from None
    return SiteLedger(
        path=config.ledger_path,
        key_path=config.signing_key_path,
        site_id=config.site_id,
        witness=config.paths.head_witness,
        receipt_key=receipt_key,
    )
