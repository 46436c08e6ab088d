"""Many devices on real data: dataset adapters, the simulation, evaluation and reports.

``simulate(SimulationConfig(...))`` runs every simulated user as a device (the real
``sottovoce.device`` code on its own SQLite store) against the real regional aggregators, and
measures every row of the comparison table in the same run; :func:`write_report` turns its
results into one HTML file. Adapters: :func:`load_lastfm` (HetRec 2011 Last.fm 2K, read in
place) and :func:`load_interactions_csv` (any interactions CSV, optional item features).

Errors (``code`` in the middle column)::

    SimulationError    simulation_invalid  the simulation cannot run as configured (the message
    │                                      says why)
    └── DatasetError   dataset_invalid     a dataset file that does not fit its format; names
                       | dataset_missing   the file, the line and the field
                       | dataset_too_small

``SimulationError`` derives from :class:`sottovoce.SottovoceError`; errors of the parts a run
drives (devices, sync, aggregators) keep their own packages' types.
"""

from sottovoce.sim._datasets import (
    Dataset,
    DatasetError,
    Interaction,
    build_item_vectors,
    load_interactions_csv,
    load_lastfm,
)
from sottovoce.sim._evaluate import (
    PopularityRanker,
    RandomRanker,
    candidate_pools,
    evaluate,
    hr_at_k,
    mrr,
    ndcg_at_k,
    split_holdout,
)
from sottovoce.sim._report import write_report
from sottovoce.sim._simulate import (
    SimulationConfig,
    SimulationError,
    default_lastfm_path,
    simulate,
)

__all__ = [
    "Dataset",
    "DatasetError",
    "Interaction",
    "PopularityRanker",
    "RandomRanker",
    "SimulationConfig",
    "SimulationError",
    "build_item_vectors",
    "candidate_pools",
    "default_lastfm_path",
    "evaluate",
    "hr_at_k",
    "load_interactions_csv",
    "load_lastfm",
    "mrr",
    "ndcg_at_k",
    "simulate",
    "split_holdout",
    "write_report",
]
