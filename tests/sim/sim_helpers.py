"""Shared helpers of the simulator tests: the real Last.fm files (loaded once) and small
hand-made datasets."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from sottovoce.policy import Policy, example_policy, policy_from_data
from sottovoce.sim._datasets import Dataset, Interaction, TagAssignment, load_lastfm

LASTFM = Path(__file__).resolve().parents[3] / "shared" / "data" / "lastfm-hetrec2011-2k"


@cache
def _load() -> Dataset:
    return load_lastfm(LASTFM)


def lastfm() -> Dataset:
    """The full HetRec 2011 Last.fm 2K dataset, or a skip when its files are not there."""
    if not (LASTFM / "user_artists.dat").is_file():
        pytest.skip(f"the Last.fm files are not at {LASTFM} (see DESIGN.md, Data for evaluation)")
    return _load()


def tiny(users: int = 8, items: int = 30) -> Dataset:
    """A small dataset: user u plays items u..u+9 (with counts) and skips one more."""
    per_user = {}
    for u in range(users):
        rows = [Interaction(f"i{(u + k) % items}", None, "play", float(2**k)) for k in range(10)]
        rows.append(Interaction(f"i{(u + 10) % items}", None, "skip"))
        per_user[f"u{u}"] = rows
    tags = [
        TagAssignment(f"u{u}", f"i{(u + k) % items}", f"t{(u + k) % 5}")
        for u in range(users)
        for k in range(6)
    ]
    return Dataset.build("tiny", per_user, catalog=[f"i{n}" for n in range(items)], tags=tags)


def lastfm_slice(users: int) -> Dataset:
    """The first ``users`` Last.fm users with 50 artists, all the catalog's tags on their
    artists (cut from the loaded dataset: parsing the files again takes seconds)."""
    full = lastfm()
    chosen = [u for u in full.users if len(full.interactions[u]) == 50][:users]
    return Dataset.build(
        f"lastfm[{users}]",
        {u: full.interactions[u] for u in chosen},
        artists=full.artists,
        tags=full.tags,
        titles=full.titles,
    )


def small_policy(min_cohort: int = 4) -> Policy:
    """The example policy with a minimum cohort a few simulated devices can meet (the simulator
    never lowers a policy's minimum cohort itself)."""
    data = example_policy().model_dump(mode="json")
    for region in data["regions"]:
        region["privacy"]["min_cohort"] = min_cohort
    return policy_from_data(data)
