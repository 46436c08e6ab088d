"""The device's own privacy ledger (``privacy_spend``): every round it was charged for, per
region, from which :func:`sottovoce.sync.check_budget` recomputes its epsilon. No personal
data: round ids and mechanism parameters. Erasing a user does not reset it: the budget is the
device's, and a reset would let a round spend it twice."""

from __future__ import annotations

from sottovoce.device._rows import from_ms, to_ms
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_file import StoreFile
from sottovoce.policy import PrivacyMode
from sottovoce.sync import Charge, Mechanism

__all__ = ["DeviceLedger"]


class DeviceLedger:
    """The ``privacy_spend`` table."""

    def __init__(self, file: StoreFile) -> None:
        self._file = file

    @guarded("reading the privacy ledger")
    def history(self, region: str) -> list[Charge]:
        """Every round the device was charged for in ``region``, oldest first."""
        rows = self._file.conn.execute(
            "SELECT round_id, period_start_ts, noise_multiplier, sampling_rate, sensitivity, "
            "charged_ts, mode FROM privacy_spend WHERE region = ? ORDER BY charged_ts", (region,)
        )  # fmt: skip
        return [Charge(round_id, region, from_ms(start), Mechanism(z, q, c), from_ms(at),
                       PrivacyMode(mode))
                for round_id, start, z, q, c, at, mode in rows]  # fmt: skip

    def charge(self, charge: Charge) -> None:
        """Add a round to the ledger (once per round)."""
        with self._file.write():
            self.put(charge)

    def put(self, charge: Charge) -> None:
        """Add a round inside the caller's write (a second charge for it is ignored)."""
        m = charge.mechanism
        self._file.conn.execute(
            "INSERT OR IGNORE INTO privacy_spend (region, round_id, mode, period_start_ts, "
            "noise_multiplier, sampling_rate, sensitivity, charged_ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (charge.region, charge.round_id, charge.mode.value, to_ms(charge.period_start),
             m.noise_multiplier, m.sampling_rate, m.sensitivity, to_ms(charge.at)),
        )  # fmt: skip
