"""Each region's mechanism for a run: the policy's, with the simulated population, the
pipeline's sampling rate and the least noise multiplier whose rounds fit the region's budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sottovoce.policy import PrivacyMode
from sottovoce.sim._config import Plans, RegionPlan, SimulationConfig
from sottovoce.sim._errors import SimulationError
from sottovoce.sync._budget import device_accountant, mechanism
from sottovoce.sync._budget import epsilon as budget_epsilon

__all__ = ["Pipeline", "region_plans"]


@dataclass(frozen=True)
class Pipeline:
    """What a pipeline's rounds are: their mode, the model's size, how many, and the share of a
    region's devices each round samples."""

    mode: PrivacyMode
    dim: int
    rounds: int
    sampling_rate: float


def region_plans(config: SimulationConfig, region_of: dict[str, str],
                  pipelines: dict[str, Pipeline]) -> Plans:  # fmt: skip
    """Per pipeline and region, the policy's mechanism for the simulated population at the
    pipeline's sampling rate, with the least noise multiplier (not below the policy's) whose
    rounds fit the budget by both ledgers: the aggregator's (opacus) and the device's
    (dp-accounting)."""
    from sottovoce.aggregator import epsilon_of

    plans: Plans = {name: {} for name in pipelines}
    for region_id in config.regions:
        privacy = config.policy.region(region_id).privacy
        users = sum(1 for r in region_of.values() if r == region_id)
        budget = min(privacy.epsilon, config.epsilon)
        for pipeline, shape in pipelines.items():
            mode, dim, rounds, q = shape.mode, shape.dim, shape.rounds, shape.sampling_rate
            _check_cohort(region_id, users, q, privacy.min_cohort)

            def server(z: float, *, mode: PrivacyMode = mode, q: float = q, privacy: Any = privacy,
                       dim: int = dim, rounds: int = rounds) -> float:  # fmt: skip
                used = mechanism(mode, noise_multiplier=z, sampling_rate=q, dim=dim)
                return epsilon_of(
                    [(used.noise_multiplier, used.sampling_rate, rounds, used.sensitivity)],
                    delta=privacy.delta, accountant=privacy.accountant,
                )  # fmt: skip

            def spent(z: float, *, mode: PrivacyMode = mode, q: float = q, privacy: Any = privacy,
                      dim: int = dim, rounds: int = rounds) -> float:  # fmt: skip
                used = mechanism(mode, noise_multiplier=z, sampling_rate=q, dim=dim)
                device = budget_epsilon(
                    [used] * rounds,
                    delta=privacy.delta,
                    accountant=device_accountant(privacy.accountant),
                )
                return max(server(z), device)

            low, high = privacy.noise_multiplier, 256.0
            if server(high) > budget:
                raise SimulationError(f"{rounds} rounds of the {pipeline} pipeline cannot fit "
                                      f"region {region_id}'s ε {budget}: use fewer rounds or a "
                                      "lower sampling rate")  # fmt: skip
            if server(low) > budget * 0.999:
                # Bisect (geometrically, to 0.01 %) on the aggregator's ledger, then make sure
                # the devices' own ledger agrees (RDP: within 0.1 % of each other; PRV on the
                # aggregator and PLD on the device: within about 1 %, PRV the larger). Each
                # step is a fresh accountant's answer, which at a sampling rate below 1 takes a
                # fraction of a second: the step count is what a run's set-up costs.
                while high > low * (1 + 1e-4):
                    middle = math.sqrt(low * high)
                    fits = server(middle) <= budget * 0.999
                    low, high = (low, middle) if fits else (middle, high)
            else:
                high = low  # the policy's minimum already fits
            while spent(high) > budget:
                high *= 1.001
            used = mechanism(mode, noise_multiplier=high, sampling_rate=q, dim=dim)
            plans[pipeline][region_id] = RegionPlan(
                mode=mode.value, users=users, min_cohort=privacy.min_cohort,
                noise_multiplier=high, sampling_rate=q, sensitivity=used.sensitivity,
                epsilon_budget=budget, epsilon=spent(high), delta=privacy.delta,
                accountant=str(privacy.accountant),
            )  # fmt: skip
    return plans


def _check_cohort(region_id: str, users: int, q: float, min_cohort: int) -> None:
    if q * users >= min_cohort:
        return
    need = min_cohort / max(users, 1)
    fix = f"use --sampling-rate {need:.3g} or more, more users" if need <= 1 else "use more users"
    raise SimulationError(
        f"region {region_id} has {users} simulated devices: at sampling rate {q:g} a round "
        f"expects {q * users:.3g} of them, below the policy's minimum cohort of {min_cohort} "
        f"(the simulator runs the policy as declared); {fix}, or pass a policy with a smaller "
        "minimum cohort (--policy)"
    )
