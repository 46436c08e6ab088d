"""The collaborative model's private row over many noise draws, in seconds: an offline replica
of ``sottovoce simulate``'s DP rounds, for judging a change to the model before a whole run.

Prints one JSON object (progress goes to stderr): each draw's table size and NDCG@10 under the
simulation's full-ranking protocol, their mean and spread, and in the same run the same rounds
without noise, popularity and (``--ease``) EASE on the same split.

What is the same as a run: the dataset, split, region assignment and layout
(:func:`sottovoce.sim._collaborative.layout_for`, the private rank), each region's noise
multiplier (:func:`sottovoce.sim._plans.region_plans`, the same budget search), every device's
upload (:func:`sottovoce.device._collaborative.collaborative_upload` of what its store counts,
:func:`sottovoce.sim._device_feed.listening`), each region's mean over its expected cohort,
the pooling of the regions' releases and the model the devices derive from them
(``CollaborativeModel.from_counts`` and ``refit``), and the scoring.

What differs: no stores, no sealing, no aggregators. A region's mean gets Gaussian noise of
standard deviation ``z C s / n`` (the release's, :func:`sottovoce.device._collaborator.noise_std`)
from a generator seeded by the draw, where a run's aggregator draws a rounded Gaussian on its
fixed-point grid; so a draw is not a run's draw, but it is one of the same distribution.

Usage: ``python bench/collaborative_dp.py [--csv FILE] [--draws N] [--ease]`` (Last.fm from
``../shared`` by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import progress

from sottovoce.device._collaborative import CollaborativeModel, Layout, Statistic, pool
from sottovoce.device._collaborator import advance
from sottovoce.policy import PrivacyMode
from sottovoce.sim import SimulationConfig
from sottovoce.sim import _references as references
from sottovoce.sim._collaborative import PIPELINE, Listened, layout_for, mean_upload, scorer
from sottovoce.sim._config import RegionPlan
from sottovoce.sim._datasets import build_item_vectors, device_content, item_vector_source
from sottovoce.sim._device_feed import listening
from sottovoce.sim._evaluate import split_holdout
from sottovoce.sim._full_ranking import Interactions, evaluate_full
from sottovoce.sim._plans import Pipeline, region_plans
from sottovoce.sim._simulate import _assign_regions, _load
from sottovoce.sync._noise import sensitivity_factor


def rounds(layout: Layout, listened: Listened, members: Mapping[str, list[int]],
           plans: Mapping[str, RegionPlan], *, count: int, clipping_norm: float,
           rng: np.random.Generator | None) -> CollaborativeModel:  # fmt: skip
    """``count`` rounds (a count round, then factor rounds); no noise when ``rng`` is None."""
    s = sensitivity_factor(layout.dim)
    model: CollaborativeModel | None = None
    for _ in range(count):
        releases = []
        for region, people in members.items():
            plan = plans[region]
            cohort = plan.expected_cohort
            mean = mean_upload(model, layout, listened, people, over=cohort,
                               clipping_norm=clipping_norm)  # fmt: skip
            std = 0.0
            if rng is not None:
                std = plan.noise_multiplier * clipping_norm * s / cohort
                mean = mean + rng.standard_normal(layout.dim) * std
            releases.append(Statistic(mean, std, cohort))
        pooled = pool(releases)
        model = advance(model, layout, pooled.mean, noise_std=pooled.noise_std)
    assert model is not None
    return model


@dataclass(frozen=True)
class Replica:
    """What a run of the dataset fixes before its collaborative rounds."""

    config: SimulationConfig
    data: Any  # sim._datasets.Dataset
    matrix: Interactions
    listened: Listened
    region_of: dict[str, str]
    members: dict[str, list[int]]
    layout: Layout
    plans: Mapping[str, RegionPlan]
    clipping_norm: float
    content: npt.NDArray[np.float64] | None  # the catalog's public item vectors, if any

    @classmethod
    def of(cls, config: SimulationConfig) -> Replica:
        data = _load(config)
        split = split_holdout(data, fraction=config.holdout, seed=config.seed, by=config.split)
        matrix = Interactions.of(data, split.train, split.heldout)
        region_of = _assign_regions(data.users, config)
        members = {r: [n for n, u in enumerate(matrix.users) if region_of[u] == r]
                   for r in config.regions}  # fmt: skip
        layout = layout_for(data.items, config.seed, private=True)
        progress(f"{data.name}: {len(matrix.users)} users; planning each region's noise")
        shape = Pipeline(PrivacyMode.CENTRAL, layout.dim, config.collaborative_rounds,
                         config.collaborative_sampling_rate)  # fmt: skip
        plans = region_plans(config, region_of, {PIPELINE: shape})[PIPELINE]
        norms = {config.policy.region(r).privacy.clipping_norm for r in config.regions}
        if len(norms) != 1:
            raise SystemExit("the replica assumes one clipping norm across regions")
        vectors = build_item_vectors(data, train=split.train, seed=config.seed)
        content = device_content(data, vectors)  # public content only: what a device blends
        listened = [listening(split.train[user]) for user in matrix.users]
        return cls(config, data, matrix, listened, region_of, members, layout, plans,
                   norms.pop(), content)  # fmt: skip

    def measure(self, rng: np.random.Generator | None) -> dict[str, Any]:
        """One draw (``rng``; None: no noise): the table's size and NDCG@10, blended with the
        catalog's public content when it has some (and then the model alone beside it)."""
        config = self.config
        model = rounds(self.layout, self.listened, self.members, self.plans,
                       count=config.collaborative_rounds, clipping_norm=self.clipping_norm,
                       rng=rng)  # fmt: skip
        models = dict.fromkeys(config.regions, model)

        def ndcg(content: npt.NDArray[np.float64] | None) -> float:
            score = scorer(self.matrix, models, self.region_of, self.listened, content=content)
            found = evaluate_full(score, self.matrix, seed=config.seed, bootstrap=10)
            return round(float(found["ndcg@10"]), 4)

        out: dict[str, Any] = {"table": len(model.table), "ndcg@10": ndcg(self.content)}
        if self.content is not None:
            out["model_only"] = ndcg(None)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, help="an interactions CSV instead of Last.fm")
    parser.add_argument("--item-features", type=Path, help="the CSV's item features, if any")
    parser.add_argument("--draws", type=int, default=5, help="noise draws (seeds 0, 1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (split, regions)")
    parser.add_argument("--ease", action="store_true", help="also EASE (tens of seconds)")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    if args.item_features and not args.csv:
        parser.error("--item-features goes with --csv")

    started = time.perf_counter()
    replica = Replica.of(SimulationConfig(csv=args.csv, item_features=args.item_features,
                                          users=None, seed=args.seed))  # fmt: skip
    draws = []
    for draw in range(args.draws):
        draws.append({"draw": draw, **replica.measure(np.random.default_rng([draw, 11]))})
        progress(f"draw {draw}: {draws[-1]}")
    noiseless = replica.measure(None)
    matrix, seed = replica.matrix, args.seed
    scores = [d["ndcg@10"] for d in draws]
    alone = [d["model_only"] for d in draws if "model_only" in d]
    regions = {r: {"noise_multiplier": round(p.noise_multiplier, 4),
                   "expected_cohort": p.expected_cohort, "epsilon": round(p.epsilon, 3),
                   "budget": p.epsilon_budget} for r, p in replica.plans.items()}  # fmt: skip
    popular = evaluate_full(references.popularity(matrix), matrix, seed=seed, bootstrap=10)
    out: dict[str, Any] = {
        "dataset": replica.data.name,
        "users": len(matrix.users),
        "rounds": replica.config.collaborative_rounds,
        "rank": replica.layout.rank,
        "regions": regions,
        "content": item_vector_source(replica.data) if replica.content is not None else None,
        "draws": draws,
        "ndcg@10_mean": round(statistics.fmean(scores), 4),
        "ndcg@10_sd": round(statistics.stdev(scores), 4) if len(scores) > 1 else None,
        "model_only_mean": round(statistics.fmean(alone), 4) if alone else None,
        "noiseless": noiseless,
        "popularity_ndcg@10": round(popular["ndcg@10"], 4),
    }
    if args.ease:
        ease, lam = references.ease(matrix, seed=seed)
        found = evaluate_full(ease, matrix, seed=seed, bootstrap=10)
        out["ease"] = {"ndcg@10": round(found["ndcg@10"], 4), "lambda": lam}
        out["ratio_mean_vs_ease"] = round(out["ndcg@10_mean"] / found["ndcg@10"], 4)
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
