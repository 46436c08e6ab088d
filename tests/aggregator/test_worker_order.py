"""The service's Worker decides waiting uploads before waiting enrollments, in groups of at most
``max_group`` uploads and ``max_writes`` other writes, and starves neither: each pass takes one
group of each. The aggregator here records the groups it is handed (what is under test is the
Worker's order, not the decisions, which tests/aggregator/test_group_commit.py covers)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from sottovoce.aggregator._edge import Worker


class Recorder:
    """Stands in for the region's aggregator: records each group's kind and size; the first
    group blocks until released, so requests queue up behind it."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, int]] = []
        self.release = threading.Event()

    def accept_many(self, uploads: list[Any], *, parsed: list[Any]) -> list[str]:
        assert len(parsed) == len(uploads)
        return self._group("uploads", [body.decode() for body, _, _ in uploads])

    def write_many(self, calls: list[Any]) -> list[Any]:
        return self._group("writes", [call(self) for call in calls])

    def _group(self, kind: str, results: list[Any]) -> list[Any]:
        if not self.groups:
            self.release.wait(10)
        self.groups.append((kind, len(results)))
        return results

    def close(self) -> None:
        pass


async def _run(uploads: int, writes: int) -> tuple[Recorder, list[Any]]:
    recorder = Recorder()
    worker = Worker(lambda: recorder, max_group=8, max_writes=4)  # type: ignore[arg-type,return-value]
    await worker.start()
    try:
        blocker = asyncio.ensure_future(worker.write(lambda _: "first"))
        await asyncio.sleep(0.05)  # the first group is under way and blocks
        waiting = [worker.write(lambda _, i=i: f"w{i}") for i in range(writes)]
        waiting += [worker.accept(f"u{i}".encode(), f"key-{i}", record=True)
                    for i in range(uploads)]  # fmt: skip
        tasks = [asyncio.ensure_future(w) for w in waiting]
        await asyncio.sleep(0.05)  # every request is queued behind the first group
        recorder.release.set()
        answers = await asyncio.gather(blocker, *tasks)
    finally:
        worker.stop()
    return recorder, answers


def test_uploads_go_before_enrollments_in_bounded_groups() -> None:
    recorder, answers = asyncio.run(_run(uploads=10, writes=10))
    assert recorder.groups == [
        ("writes", 1),  # the group under way when the others arrived
        ("uploads", 8), ("writes", 4),  # each pass: uploads first, then other writes
        ("uploads", 2), ("writes", 4),
        ("writes", 2),
    ]  # fmt: skip
    assert answers == ["first", *(f"w{i}" for i in range(10)), *(f"u{i}" for i in range(10))]


def test_enrollments_progress_while_uploads_keep_coming() -> None:
    recorder, _ = asyncio.run(_run(uploads=40, writes=8))
    kinds = [kind for kind, _ in recorder.groups[1:]]
    # Two write groups go within the first four passes, not after all five upload groups.
    assert kinds[:4] == ["uploads", "writes", "uploads", "writes"]
    assert sum(n for kind, n in recorder.groups[1:] if kind == "uploads") == 40
