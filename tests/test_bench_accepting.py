"""The aggregator benchmark's in-process runs (``bench/_accepting.py``) measure what they say:
the service's Worker, fed by concurrent clients, decides uploads in groups and counts each
delta once, on both backends; a fixed-group run and a one-at-a-time run count the same."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _accepting import as_service, in_groups, one_at_a_time
from _region import check_published, close_round, make_keys, open_db, prepare

BASE = np.zeros(64, dtype=np.float32)  # a small model: the grouping, not the arithmetic
MODEL = "0" * 64


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_service_mode_groups_concurrent_uploads(backend: str, tmp_path: Path) -> None:
    conn = open_db(backend)
    prepared = prepare(conn, make_keys(tmp_path / "keys"), n=30, model_id=MODEL, base=BASE)
    wall, latencies, sizes = as_service(prepared, clients=10)
    assert wall > 0 and len(latencies) == 30
    assert sum(sizes) == 30
    assert max(sizes) > 1, sizes  # ten clients with one upload in flight each: groups form
    info = prepared.agg.round(prepared.spec.round_id)
    assert info is not None and info.count == 30
    close_round(prepared.agg, prepared.spec, prepared.clock)
    check_published(prepared.agg, prepared.spec, 30)
    conn.close()


def test_fixed_groups_and_one_at_a_time_count_every_delta(tmp_path: Path) -> None:
    counts = []
    for name, run in (("groups", lambda p: in_groups(p, 4)), ("single", one_at_a_time)):
        conn = open_db(str(tmp_path / f"{name}.db"))
        prepared = prepare(conn, make_keys(tmp_path / name), n=10, model_id=MODEL, base=BASE)
        times = run(prepared)
        assert len(times) == (3 if name == "groups" else 10)  # 4 + 4 + 2, or one call each
        info = prepared.agg.round(prepared.spec.round_id)
        assert info is not None
        counts.append(info.count)
        conn.close()
    assert counts == [10, 10]
