"""What the simulator's parts share: the run's configuration, its constants and errors, each
device's place on disk, the run's policies and region keys, and the evaluation of weights."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from sottovoce.policy import Policy, PrivacyMode, example_policy, policy_from_data
from sottovoce.sim._central import scores
from sottovoce.sim._devices import (
    DeviceSetup,
    DeviceTask,
)
from sottovoce.sim._errors import SimulationError
from sottovoce.sim._evaluate import (
    Pool,
    evaluate,
)
from sottovoce.sync.transport import RetryPolicy

if TYPE_CHECKING:  # the aggregator extra is imported only when a run needs it
    from sottovoce.aggregator import RegionKeys

T = TypeVar("T")
ROWS = ("random", "popularity", "itemknn", "ease", "local_only", "federated", "federated_dp")
"""The full-ranking table (``metrics``): references, what a device does alone, and the
collaborative model without and with DP. When the dataset has public item vectors (features or
Last.fm's tags), the collaborative rows are the device's blend of the model with them, and each
is followed by the model alone (its name and :data:`MODEL_ONLY`)."""
MODEL_ONLY = "_model_only"
RERANKER_ROWS = ("random", "popularity", "central", "central_dp", "federated",
                 "federated_global_only", "federated_dp", "federated_dp_global_only",
                 "federated_dp_local", "federated_dp_local_global_only")  # fmt: skip
"""The session reranker's table (``metrics_sampled``: held-out items among sampled ones)."""
END = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)  # the devices' clock: their history ends here
TOKEN = "simulation-enrollment-token"
RETRY = RetryPolicy(attempts=3, initial=0.01, maximum=0.1)


def default_lastfm_path() -> Path:
    """``$SOTTOVOCE_LASTFM``, else the shared HetRec folder next to the repository."""
    env = os.environ.get("SOTTOVOCE_LASTFM")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "lastfm-hetrec2011-2k"


@dataclass(frozen=True)
class SimulationConfig:
    """A run; the defaults are the README demo's (a few minutes on two cores)."""

    workdir: Path = Path("out/sim")
    lastfm: Path | None = None  # default: default_lastfm_path()
    csv: Path | None = None  # a generic interactions CSV instead of Last.fm
    item_features: Path | None = None
    users: int | None = 200  # None: every user of the dataset (`simulate`'s CLI default)
    rounds: int = 5  # the reranker's rounds
    collaborative_rounds: int = 5  # the collaborative model's: one count round, then factor rounds
    reranker: bool = True  # also train and measure the session reranker (metrics_sampled)
    sampling_rate: float = 0.5  # the session reranker's rounds
    # The collaborative model's own rounds: few, each needing every device it can get (its
    # released statistics are sums over the round's cohort; at a rate below 1 the noise that the
    # budget allows falls more slowly than the cohort, so fewer devices mean less signal).
    collaborative_sampling_rate: float = 1.0
    local_steps: int = 50
    epsilon: float = 8.0  # the run's cap on each region's ε (the policy's budget may be lower)
    central_epochs: int = 3
    examples: int = 500  # training examples per device (its most recent history)
    catalog_sample: int = 300  # catalog items a device caches beyond its own and its pool
    regions: tuple[str, ...] = ("eu", "us")
    workers: int = 2
    server: bool = False
    seed: int = 0
    holdout: float = 0.2
    split: str = "random"  # "random": a seeded 20 % of each user's items; "time": the latest 20 %
    negatives: int = 100  # for the labelled sampled metrics (metrics_sampled)
    skip_bad_rows: bool = False  # a generic CSV's malformed rows: skipped and counted, not an error
    policy: Policy = field(default_factory=example_policy)
    # What leaves the devices can be observed (tests, audits): ``on_request`` sees every HTTP
    # request the simulated devices and operator send, at the transport seam; ``relay`` maps
    # an aggregator's URL to the one devices should use instead (e.g. a recording proxy).
    on_request: Callable[[httpx.Request], None] | None = field(default=None, compare=False)
    relay: Callable[[str], str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        checks = {
            "users must be at least 10": self.users is None or self.users >= 10,
            "rounds must be at least 1": self.rounds >= 1,
            "collaborative_rounds must be at least 2 (a count round, then factor rounds)": (
                self.collaborative_rounds >= 2
            ),
            "sampling_rate must be in (0, 1]": 0 < self.sampling_rate <= 1,
            "collaborative_sampling_rate must be in (0, 1]": (
                0 < self.collaborative_sampling_rate <= 1
            ),
            "local_steps must be at least 1": self.local_steps >= 1,
            "epsilon must be positive": self.epsilon > 0,
            "workers must be at least 1": self.workers >= 1,
            "regions must not be empty": bool(self.regions),
            "split must be 'random' or 'time'": self.split in ("random", "time"),
        }
        for message, ok in checks.items():
            if not ok:
                raise SimulationError(message)


class Progress(Protocol):
    def start(self, name: str, total: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def note(self, text: str) -> None: ...


class Quiet:
    def start(self, name: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class RegionPlan:
    """One region's mechanism in one privacy mode for the run: the policy's, with the region's
    population set to the devices simulated in it and the run's sampling rate."""

    mode: str
    users: int  # the simulated region's population
    min_cohort: int  # the policy's, never changed
    noise_multiplier: float  # the least that fits the run's rounds in the budget
    sampling_rate: float
    sensitivity: float  # in units of C (sync._budget.mechanism)
    epsilon_budget: float
    epsilon: float  # what all the run's rounds would spend (the accountant's figure)
    delta: float
    accountant: str

    @property
    def expected_cohort(self) -> float:
        return self.sampling_rate * self.users


Plans = dict[str, dict[str, RegionPlan]]  # pipeline (central, local, collaborative) -> region


def device_task(config: SimulationConfig, pipeline: str, user: str, region: str,
                 policy: Policy) -> DeviceTask:  # fmt: skip
    path = config.workdir / "devices" / pipeline / region / f"{safe_name(user)}.db"
    return DeviceTask(path, user, region, policy.model_dump_json(), config.seed)


def safe_name(user: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in user)


# -- policies and keys -----------------------------------------------------------------------


def pipeline_policy(config: SimulationConfig, plans: Plans, mode: PrivacyMode, *,
                    pipeline: str | None = None) -> Policy:  # fmt: skip
    """The run's policy for one pipeline: the given policy with every simulated region in
    ``mode``, its population the devices simulated there, the run's sampling rate, the
    noise multiplier the plan chose (never below the policy's) and the simulation's aggregator
    keys (see :func:`region_keys`). Minimum cohort, epsilon, delta, clipping norm and period
    are the policy's. ``pipeline`` names the plans and keys (default: the mode's name)."""
    name = pipeline or mode.value
    data = config.policy.model_dump(mode="json")
    regions = plans[name]
    for region in data["regions"]:
        if region["id"] not in regions:
            continue
        plan = regions[region["id"]]
        public = region_keys(config, name, region["id"]).public()
        for key in region["aggregator"]["public_keys"]:
            key["key"] = public[key["use"]]
        region["privacy"].update(mode=mode.value, population=plan.users,
                                 sampling_rate=plan.sampling_rate,
                                 noise_multiplier=plan.noise_multiplier)  # fmt: skip
    return policy_from_data(data, source=f"simulation ({name}, {mode.value} mode)")


def region_keys(config: SimulationConfig, pipeline: str, region: str) -> RegionKeys:
    """The run's keys for a region and pipeline: made the first time, then read back from the
    workdir (where ``--server`` aggregators read them too)."""
    from sottovoce.aggregator import generate_keys, load_keys

    directory = config.workdir / "keys" / pipeline / region
    return load_keys(directory) if directory.exists() else generate_keys(directory)


# -- evaluation ------------------------------------------------------------------------------


class Evaluation:
    """Ranks every evaluated user's pool with given weights (per region), from the feature
    rows each device computed from its own store."""

    def __init__(self, pools: Sequence[Pool], setups: dict[str, DeviceSetup],
                 region_of: dict[str, str]) -> None:  # fmt: skip
        self.pools, self.setups, self.region_of = pools, setups, region_of

    def metrics(self, weights: dict[str, npt.NDArray[Any]] | npt.NDArray[Any], *,
                personal: bool = True) -> dict[str, float]:  # fmt: skip
        def rank(user: str, candidates: Sequence[str]) -> list[str]:
            setup = self.setups[user]
            rows = setup.pool_x if personal else setup.pool_x_global
            w = weights[self.region_of[user]] if isinstance(weights, dict) else weights
            order = np.argsort(-scores(w, rows), kind="stable")
            return [candidates[i] for i in order]

        return {k: round(v, 5) for k, v in evaluate(rank, self.pools).items()}


@dataclass
class Run:
    """A federated pipeline's outcome: final metrics with and without personal features."""

    final: dict[str, float]
    final_global: dict[str, float]
    per_round: list[dict[str, Any]]
    audit: dict[str, Any] = field(default_factory=dict)
    privacy: list[dict[str, Any]] = field(default_factory=list)  # per region, from the ledger
