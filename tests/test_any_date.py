"""Time is an argument: a representative slice of the suite passes with the clock moved.

The whole suite is run under ``faketime '+400 days'`` and ``faketime '-200 days'`` before a
release; this test keeps the habit from silently breaking in between by running a slice (the
CLI as processes, the device store, rounds and the ledger, the transport, the README's examples)
a year ahead in every run, and 200 days back with ``-m slow``. ``scripts/test`` installs
faketime (Debian's package) when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICE = [
    "tests/test_cli.py",
    "tests/device/test_store.py",
    "tests/device/test_calendar.py",
    "tests/device/test_rebuild.py",
    "tests/aggregator/test_rounds.py",
    "tests/aggregator/test_ledger.py",
    "tests/sync/test_sync_end_to_end.py",
    "tests/test_readme.py",
]


@pytest.mark.skipif(
    "SOTTOVOCE_SHIFTED_CLOCK" in os.environ or "FAKETIME" in os.environ,
    reason="the whole run is under faketime already (a nested faketime does not add up)",
)
@pytest.mark.parametrize("shift", ["+400d", pytest.param("-200d", marks=pytest.mark.slow)])
def test_a_slice_of_the_suite_passes_with_the_clock_moved(
    shift: str, request: pytest.FixtureRequest
) -> None:
    # A year ahead in every run; the clock moved back too with -m slow (each slice takes minutes).
    if shift.startswith("-") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the clock moved back: run with -m slow")
    faketime = shutil.which("faketime")
    assert faketime is not None, "faketime is missing (apt-get install faketime)"
    # Prove the shift takes: the child's wall clock is not ours.
    probe = subprocess.run(
        [faketime, shift.replace("d", " days"), sys.executable, "-c",
         "import datetime; print(datetime.date.today().isoformat())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    import datetime as dt

    assert abs((dt.date.fromisoformat(probe) - dt.date.today()).days) >= 199
    env = {**os.environ, "SOTTOVOCE_SHIFTED_CLOCK": shift}
    run = subprocess.run(
        [faketime, shift.replace("d", " days"), sys.executable, "-m", "pytest", "-q", "-x",
         "-p", "no:cacheprovider", *SLICE],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
