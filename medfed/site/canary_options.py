"""The canary audit's choices and their defaults, importable without loading any of the audit.

The command line shows these defaults in ``medfed audit canary --help``; the audit itself
(:mod:`medfed.site.canary_audit`) uses the same ones.
"""

from __future__ import annotations

from typing import Final, Literal

#: gradient: white-box Dirac gradient canaries; loss: black-box loss drop of canary patients.
ScoreKind = Literal["gradient", "loss"]
DEFAULT_CANARIES: Final = 1000
#: Small enough that an honest run's bound stays far below it and a broken run's far above.
DEFAULT_EPSILON: Final = 2.0
DEFAULT_CONFIDENCE: Final = 0.95
MIN_CANARIES: Final = 10
