"""The researcher's Python API; :mod:`medfed` re-exports the curated names lazily.

Modules: :mod:`~medfed.api.sites` (synthetic sites and a workspace for them),
:mod:`~medfed.api.planner` (privacy planning before a study), :mod:`~medfed.api.running`
(in-process and submitted federations), :mod:`~medfed.api.results` (a run's events as pandas
tables), :mod:`~medfed.api.progress` (progress for terminals and notebooks). Nothing heavy is
imported here.
"""
