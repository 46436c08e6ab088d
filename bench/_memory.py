"""Memory runs of ``bench/aggregator.py``: peak RSS of a fresh process aggregating a round of N
deltas, against an in-memory server that keeps every delta.

The streaming run (:func:`stream_child`) builds the aggregator and opens the round (this imports
opacus and torch), then enrolls and decides N deltas that its child (:func:`generate_child`)
seals on the fly and streams through a pipe, in groups of ``group`` (``accept_many``, as the
service decides concurrent uploads), so it never holds more than one group, and closes the round
(a sweep past its deadline). Peak is its ``ru_maxrss`` (RUSAGE_SELF; the child is not included),
nothing subtracted; ``baseline_rss_mb`` is the same measure after setup, before the first delta.
``accept_per_s_by_tenth`` is the decision rate in each tenth of the run: whether a decision
costs more as the round's cohort grows.

The naive run (:func:`naive_child`) keeps every delta as a float32 array in a list and averages
at the end (``reduce(np.add) / n``, like Flower's ``aggregate`` without its weighted copy of
every delta, which would double the peak). It is handed vectors drawn with numpy (no parsing,
decryption, verification, database or torch): a lower bound of what such a server holds.
"""

from __future__ import annotations

import base64
import functools
import json
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from _common import progress
from _region import (
    DELTA_NORM,
    BenchClock,
    Devices,
    build_aggregator,
    check_published,
    close_round,
    database_mb,
    open_db,
    open_round,
    raw_public_b64,
)

if TYPE_CHECKING:
    from sottovoce.aggregator import RegionAggregator

# One streamed delta: lengths of the device key (base64), the idempotency key and the body.
FRAME = struct.Struct("<HHI")


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def vmhwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def generate_child(args: list[str]) -> None:
    """Child of the streaming run: seals deltas one at a time and writes them as frames."""
    from sottovoce.sync import SignedRoundSpec

    spec_path, hpke_public_b64, n, dim = args
    spec = SignedRoundSpec.from_wire(Path(spec_path).read_bytes()).spec
    devices = Devices(seed=int(n), dim=int(dim))
    hpke_public = base64.b64decode(hpke_public_b64)
    out = sys.stdout.buffer
    for i in range(int(n)):
        device_key, key, body = devices.seal(i, spec, hpke_public)
        out.write(FRAME.pack(len(device_key), len(key), len(body)))
        out.write(device_key.encode() + key.encode() + body)
    out.flush()


def read_frames(stream: IO[bytes]) -> Iterator[tuple[str, str, bytes]]:
    while head := stream.read(FRAME.size):
        lengths = FRAME.unpack(head)
        data = stream.read(sum(lengths))
        if len(data) != sum(lengths):
            raise SystemExit("the delta stream ended inside a frame")
        a, b = lengths[0], lengths[0] + lengths[1]
        yield data[:a].decode(), data[a:b].decode(), data[b:]


def start_generator(
    agg: RegionAggregator, work: Path, hpke: Any, *, n: int, dim: int
) -> subprocess.Popen[bytes]:
    """The child that seals the open round's ``n`` deltas and streams them on its stdout."""
    signed = agg.current_round()
    assert signed is not None
    spec_path = work / f"stream-{n}-spec.json"
    spec_path.write_bytes(signed.to_wire())
    return subprocess.Popen(
        [sys.executable, sys.argv[0], "_generate", str(spec_path), raw_public_b64(hpke),
         str(n), str(dim)],
        stdout=subprocess.PIPE,
    )  # fmt: skip


def stream_child(args: list[str]) -> None:
    """Child: enroll and decide N streamed deltas into one round, in groups; print peak RSS."""
    from sottovoce.aggregator import load_keys
    from sottovoce.sync import period_label

    config = json.loads(args[0])
    n, group, target = config["n"], config["group"], config["target"]
    base = np.load(config["base"])
    keys = load_keys(Path(config["keys"]))
    conn = open_db(target, config["journal"])
    clock = BenchClock()
    agg = build_aggregator(conn, keys, cohort=n, model_id=config["model_id"], base=base,
                           clock=clock)  # fmt: skip
    spec = open_round(agg, keys, clock)
    period = period_label(spec)
    generator = start_generator(agg, Path(config["workdir"]), keys.hpke, n=n, dim=base.size)
    assert generator.stdout is not None
    baseline = peak_rss_mb()
    enrolling = 0.0
    # Decision time per tenth of the run: a cost that grows with the cohort shows up here.
    tenth, by_tenth, in_tenth = max(1, n // 10), [0.0] * 10, [0] * 10
    count, batch = 0, []
    start = time.perf_counter()

    def decide(batch: list[tuple[bytes, str, bool]]) -> None:
        t = time.perf_counter()
        answers = agg.accept_many(batch)
        by_tenth[min(9, count // tenth)] += time.perf_counter() - t
        in_tenth[min(9, count // tenth)] += len(batch)
        refused = [a for a in answers if isinstance(a, Exception) or not a.added]
        if refused:
            raise SystemExit(f"deltas before {count} were refused: {refused[:3]}")

    for device_key, key, body in read_frames(generator.stdout):
        t0 = time.perf_counter()
        agg.enroll(device_key, period)
        enrolling += time.perf_counter() - t0
        batch.append((body, key, True))
        count += 1
        if len(batch) == group:
            decide(batch)
            batch = []
        if count % tenth == 0:
            progress(f"[bench/aggregator] memory run of {n}: {count} deltas, peak RSS "
                     f"{peak_rss_mb()} MB")  # fmt: skip
    if batch:
        decide(batch)
    elapsed = time.perf_counter() - start
    rates = [round(k / s, 1) if s else None for k, s in zip(in_tenth, by_tenth, strict=True)]
    if generator.wait() != 0 or count != n:
        raise SystemExit(f"the delta generator failed after {count} of {n} deltas")
    close_s = close_round(agg, spec, clock)
    progress(f"[bench/aggregator] memory run of {n}: round closed by a sweep in {close_s:.2f} s")
    check_published(agg, spec, n)
    size = database_mb(conn, target)
    conn.close()
    print(json.dumps({
        "n": n,
        "group": group,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "vmhwm_mb": vmhwm_mb(),
        "seconds": round(elapsed, 1),
        "accept_per_s": round(n / sum(by_tenth), 1),
        "accept_per_s_by_tenth": rates,
        "enroll_ms": round(enrolling / n * 1000, 3),
        "db_mb": size,
    }))  # fmt: skip


def naive_child(args: list[str]) -> None:
    """Child: keep every delta in a list of float32 arrays, average at the end; print peak RSS."""
    n, dim = int(args[0]), int(args[1])
    rng = np.random.default_rng(n)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    deltas = []
    for i in range(n):
        values = rng.standard_normal(dim, dtype=np.float32)
        values *= np.float32(DELTA_NORM / np.linalg.norm(values))
        deltas.append(values)
        if (i + 1) % max(1, n // 10) == 0:
            progress(f"[bench/aggregator] naive run of {n}: {i + 1} deltas held, peak RSS "
                     f"{peak_rss_mb()} MB")  # fmt: skip
    mean = functools.reduce(np.add, deltas) / n
    print(json.dumps({
        "n": n,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "vmhwm_mb": vmhwm_mb(),
        "seconds": round(time.perf_counter() - start, 1),
        "mean_norm": round(float(np.linalg.norm(mean)), 6),
    }))  # fmt: skip


def summary(small: dict[str, Any], large: dict[str, Any], settings: str) -> dict[str, Any]:
    """The memory keys of the bench's JSON, from the small and the large streaming runs."""
    s, b = small, large
    growth_small = s["peak_rss_mb"] - s["baseline_rss_mb"]
    growth_large = b["peak_rss_mb"] - b["baseline_rss_mb"]
    return {
        "n_small": s["n"],
        "n_large": b["n"],
        "peak_rss_mb_1k": s["peak_rss_mb"],
        "peak_rss_mb_100k": b["peak_rss_mb"],
        "baseline_rss_mb": b["baseline_rss_mb"],
        "baseline_rss_mb_1k": s["baseline_rss_mb"],
        "rss_growth_mb_1k": round(growth_small, 1),
        "rss_growth_mb_100k": round(growth_large, 1),
        "peak_rss_ratio_100k_vs_1k": round(b["peak_rss_mb"] / s["peak_rss_mb"], 3),
        # A ratio of growths below 1 MB would be noise.
        "rss_growth_ratio_100k_vs_1k": (
            round(growth_large / growth_small, 2) if growth_small >= 1 else None
        ),
        "vmhwm_mb_1k": s["vmhwm_mb"],
        "vmhwm_mb_100k": b["vmhwm_mb"],
        "rss_runs": f"{settings}; OPENBLAS_NUM_THREADS=1; enroll per delta, accept_many per "
        f"group of {b['group']}, sealed by a child process and streamed through a pipe",
        "large_run_s": b["seconds"],
        "large_run_accept_per_s": b["accept_per_s"],
        "large_run_accept_per_s_by_tenth": b["accept_per_s_by_tenth"],
        "large_run_enroll_ms": b["enroll_ms"],
        "large_run_db_mb": b["db_mb"],
    }
