"""``simulate`` end to end on small runs: the results file and its privacy bookkeeping, the same
seed giving the same table, the HTML report, generic CSV datasets, typed errors (also through
the CLI), and a run against real ``sottovoce aggregator serve`` processes.

Runs are kept small (a few dozen devices, one or two rounds, ten local steps). Every device
takes part in every round (``sampling_rate=1.0``) in the fast tests: the cohort is then the
same whatever second a round opens in (see ``test_the_demo_sampling_rate_is_reproducible``,
marked slow), and the noise search of each region's accountant stays quick.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sim_helpers import small_policy

from sottovoce.device import ITEM_DIM
from sottovoce.sim import (
    DatasetError,
    SimulationConfig,
    SimulationError,
    default_lastfm_path,
    simulate,
    write_report,
)

pytest.importorskip("opacus")

ROWS = ("random", "popularity", "itemknn", "ease", "local_only", "federated", "federated_dp")
FULL_METRICS = ("ndcg@10", "recall@10", "hr@10", "mrr", "coverage")
RERANKER_ROWS = ("random", "popularity", "central", "central_dp", "federated",
                 "federated_global_only", "federated_dp", "federated_dp_global_only",
                 "federated_dp_local", "federated_dp_local_global_only")  # fmt: skip
METRICS = ("hr@10", "ndcg@10", "mrr")
PIPELINES = ("reranker_federated_dp", "reranker_federated_dp_local")
MODE = {"reranker_federated_dp": "central", "reranker_federated_dp_local": "local",
        "collaborative": "central"}  # fmt: skip
PLAN = {"reranker_federated_dp": "central", "reranker_federated_dp_local": "local",
        "collaborative": "collaborative"}  # fmt: skip
SMALL: dict[str, Any] = {"rounds": 2, "sampling_rate": 1.0, "local_steps": 10,
                         "central_epochs": 1, "examples": 100, "catalog_sample": 50,
                         "negatives": 50, "workers": 2, "policy": small_policy(),
                         "collaborative_rounds": 2}  # fmt: skip
LASTFM_USERS = 20
_XMLNS = re.compile(r"""\sxmlns(:\w+)?=("[^"]*"|'[^']*'|\S+)""")


def _lastfm() -> Path:
    path = default_lastfm_path()
    if not (path / "user_artists.dat").is_file():
        pytest.skip(f"the Last.fm files are not at {path} (see DESIGN.md, Data for evaluation)")
    return path


@pytest.fixture(scope="module")
def lastfm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("lastfm") / "sim"
    config = SimulationConfig(workdir=workdir, lastfm=_lastfm(), users=LASTFM_USERS, **SMALL)
    return simulate(config), workdir


# -- what a run must satisfy -------------------------------------------------------------------


def check_results(results: dict[str, Any], *, users: int, rounds: int) -> None:
    """The schema of the results, the metrics' ranges and the run's privacy bookkeeping."""
    assert results["users"] == users and isinstance(results["dataset"], str)
    assert results["protocol"] == "full" and results["split"] == "random"
    # With public item vectors (features, Last.fm's tags) the collaborative rows are the
    # device's blend of the model with them, each followed by the model alone.
    blended = results["item_vectors"] != "cooccurrence"
    alone = {"federated_model_only", "federated_dp_model_only"} if blended else set()
    assert set(results["metrics"]) == set(ROWS) | alone
    for row in ("federated", "federated_dp"):
        expected = results["item_vectors"] if blended else None
        assert results["metrics"][row].get("content") == expected, row
    for row, values in results["metrics"].items():
        assert all(0.0 <= values[m] <= 1.0 for m in FULL_METRICS), (row, values)
        assert values["users"] == results["evaluated_users"]
        # binary relevance: NDCG@10 never exceeds HR@10; every user has a relevant item
        assert values["ndcg@10"] <= values["hr@10"] + 1e-12 and values["mrr"] > 0, (row, values)
        low, high = values["ci"]["ndcg@10"]
        assert low <= values["ndcg@10"] <= high, (row, values)
    assert set(results["metrics_sampled"]) == set(RERANKER_ROWS)
    for row, values in results["metrics_sampled"].items():
        assert set(values) == set(METRICS), row
        assert all(0.0 <= v <= 1.0 for v in values.values()), (row, values)
        assert values["ndcg@10"] <= values["hr@10"] + 1e-12 and values["mrr"] > 0, (row, values)
    assert 0 < results["epsilon"] <= 8.0 and 0 < results["delta"] <= 0.1 / (users / 2)
    assert results["noise"].startswith("seeded")
    assert results["central_dp"]["epsilon"] <= results["epsilon"] + 1e-9
    for pipeline, logs in results["audit"].items():
        for who, report in logs.items():
            assert report["ok"] and report["entries"] > 0, (pipeline, who, report)
        assert logs["devices"] == {"devices": users, "entries": logs["devices"]["entries"],
                                   "failed": 0, "ok": True}  # fmt: skip
    check_history(results, rounds=rounds)
    check_privacy(results, rounds=rounds, collaborative=results["config"]["collaborative_rounds"])


PRIVACY_FIELDS = {"pipeline", "region", "mode", "noise_multiplier", "sampling_rate", "rounds",
                  "sensitivity_factor", "epsilon", "delta", "budget"}  # fmt: skip


def pld_epsilon(entry: dict[str, Any]) -> float:
    """An entry's epsilon recomputed from its published parameters alone, with dp-accounting's
    PLD accountant (tighter than the ledger's RDP): the mechanism docs/privacy.md states."""
    import dp_accounting
    from dp_accounting import pld

    if entry["rounds"] == 0:
        return 0.0
    q = entry["sampling_rate"] if entry["mode"] == "central" else 1.0
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(
        entry["noise_multiplier"] / entry["sensitivity_factor"]
    )
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(event, entry["rounds"])
    return float(accountant.get_epsilon(entry["delta"]))


def check_privacy(results: dict[str, Any], *, rounds: int, collaborative: int) -> None:
    """One entry per pipeline, region and mode, each reproducible from its parameters: the
    reported (ledger) epsilon is never below an independent PLD recomputation (and within 2 % of
    it when the policy's accountant is PRV), and within the budget."""
    entries = results["privacy"]
    regions = set(results["regions"]["central"])
    assert {(e["pipeline"], e["region"]) for e in entries} == {
        (p, r) for p in (*PIPELINES, "collaborative") for r in regions
    }
    for entry in entries:
        assert set(entry) >= PRIVACY_FIELDS, entry
        assert entry["mode"] == MODE[entry["pipeline"]]
        if entry["pipeline"] != "collaborative":
            expected_factor = 1.000137 if entry["mode"] == "central" else 2.000275
            assert entry["sensitivity_factor"] == pytest.approx(expected_factor, abs=1e-6)
        expected = collaborative if entry["pipeline"] == "collaborative" else rounds
        assert entry["rounds"] == expected or entry["mode"] == "local", entry
        # each pipeline runs at its own sampling rate: the collaborative model's, the reranker's
        rate = ("collaborative_sampling_rate" if entry["pipeline"] == "collaborative"
                else "sampling_rate")  # fmt: skip
        if entry["mode"] == "central":
            assert entry["sampling_rate"] == results["config"][rate], entry
        independent = pld_epsilon(entry)
        assert entry["epsilon"] >= independent - 1e-9, (entry, independent)
        if entry["accountant"] == "prv":  # both ledgers account by loss distributions: close
            assert entry["epsilon"] <= independent * 1.02, (entry, independent)
        assert entry["epsilon"] <= entry["budget"] + 1e-9, entry
        assert results["epsilon"] >= entry["epsilon"]


def check_history(results: dict[str, Any], *, rounds: int) -> None:
    """Per-round quality, and rounds published or abandoned as the mode and counts say."""
    assert set(results["rounds"]) == {"reranker_federated", "collaborative", *PIPELINES}
    for pipeline, history in results["rounds"].items():
        if pipeline == "collaborative":
            assert len(history) == results["config"]["collaborative_rounds"]
            continue
        assert [r["round"] for r in history] == list(range(1, rounds + 1)), pipeline
        for record in history:
            assert all(0.0 <= record[m] <= 1.0 for m in METRICS), record
    for name, regions in results["regions"].items():
        for region, plan in regions.items():
            assert plan["epsilon"] <= plan["epsilon_budget"] <= 8.0, (region, plan)
            assert plan["users"] > 0 and plan["noise_multiplier"] > 0
            assert plan["mode"] == MODE.get(name, name)
        assert sum(plan["users"] for plan in regions.values()) == results["users"]
    for pipeline in (*PIPELINES, "collaborative"):
        mode = MODE[pipeline]
        for region, plan in results["regions"][PLAN[pipeline]].items():
            spent = 0.0
            for record in results["rounds"][pipeline]:
                outcome = record[region]
                uploaded = outcome["uploaded"]
                assert outcome["min_cohort"] == plan["min_cohort"]
                assert spent <= outcome["epsilon_after"] <= plan["epsilon_budget"] + 1e-3
                spent = outcome["epsilon_after"]
                # every queued delta got an answer; the aggregator counted what it acknowledged
                assert sum(uploaded.values()) == outcome["sampled"], outcome
                assert uploaded["acknowledged"] == outcome["counted"], outcome
                assert outcome["state"] in ("published", "abandoned"), outcome
                if mode == "central":  # every round publishes at its deadline, whatever its count
                    assert outcome["state"] == "published" and outcome["version"] >= 1, outcome
                    assert outcome["expected_cohort"] == plan["sampling_rate"] * plan["users"]
                elif outcome["state"] == "published":
                    assert outcome["counted"] >= outcome["min_cohort"], outcome
                    assert outcome["version"] >= 1
                else:
                    assert outcome["counted"] < outcome["min_cohort"], outcome
                    assert "version" not in outcome
            assert math.isclose(spent, plan["epsilon"], rel_tol=1e-2), (pipeline, region)


# -- Last.fm -----------------------------------------------------------------------------------


def test_a_small_lastfm_run_writes_its_results(lastfm_run: tuple[dict[str, Any], Path]) -> None:
    results, workdir = lastfm_run
    assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["dataset"].startswith("lastfm") and results["items"] > LASTFM_USERS
    check_results(results, users=LASTFM_USERS, rounds=SMALL["rounds"])
    assert results["item_vectors"] == "tags" and "note" not in results["metrics"]["local_only"]
    # every device took part in every round (sampling rate 1), and each round published
    for pipeline in PIPELINES:
        for record in results["rounds"][pipeline]:
            for region, plan in results["regions"]["central"].items():
                assert record[region]["sampled"] == plan["users"]
                assert record[region]["state"] == "published"


def test_the_same_seed_gives_the_same_table(
    lastfm_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    first, _ = lastfm_run
    config = SimulationConfig(workdir=tmp_path / "again", lastfm=_lastfm(), users=LASTFM_USERS,
                              **SMALL)  # fmt: skip
    second = simulate(config)
    different = {row: (first["metrics"][row], second["metrics"][row]) for row in ROWS
                 if first["metrics"][row] != second["metrics"][row]}  # fmt: skip
    assert different == {}
    assert first["metrics_sampled"] == second["metrics_sampled"]
    assert _history(first) == _history(second)


@pytest.mark.slow
def test_the_demo_sampling_rate_is_reproducible(tmp_path: Path) -> None:
    """The same seed at the demo's sampling rate (0.5): each device's coin must fall the same
    way in both runs."""
    config = {**SMALL, "sampling_rate": 0.5, "rounds": 1}
    runs = [simulate(SimulationConfig(workdir=tmp_path / str(n), lastfm=_lastfm(),
                                      users=24, **config))
            for n in range(2)]  # fmt: skip
    for run in runs:
        check_results(run, users=24, rounds=1)
        # the reranker's rounds sampled half the devices; the collaborative model's, all of them
        assert {p["sampling_rate"] for p in run["regions"]["central"].values()} == {0.5}
        assert {p["sampling_rate"] for p in run["regions"]["collaborative"].values()} == {1.0}
        for record in run["rounds"]["collaborative"]:
            for region, plan in run["regions"]["collaborative"].items():
                assert record[region]["sampled"] == plan["users"]
    cohorts = [{(p, region): (r[region]["round_id"], r[region]["sampled"])
                for p in PIPELINES for r in run["rounds"][p]
                for region in run["regions"]["central"]}
               for run in runs]  # fmt: skip
    different = [row for row in ROWS if runs[0]["metrics"][row] != runs[1]["metrics"][row]]
    sampled = [run["metrics_sampled"] for run in runs]
    different += [f"{row} (sampled)" for row in RERANKER_ROWS
                  if sampled[0][row] != sampled[1][row]]  # fmt: skip
    assert different == [], f"rows {different} differ; round ids and cohorts: {cohorts}"


def _history(results: dict[str, Any]) -> list[Any]:
    """The per-round records without what names a round by the wall clock."""
    out = []
    for pipeline, history in sorted(results["rounds"].items()):
        for record in history:
            out.append((pipeline, {k: {f: v for f, v in o.items() if f != "round_id"}
                                       if isinstance(o, dict) else o
                                   for k, o in record.items()}))  # fmt: skip
    return out


# -- the report --------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Checks that every element is closed in order and collects what points outside."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.problems: list[str] = []
        self.tags: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            namespace = name == "xmlns" or name.startswith("xmlns:")  # names, fetches nothing
            if value and ("://" in value or value.startswith("//")) and not namespace:
                self.external.append(f"{tag} {name}={value}")
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.open.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()


def test_the_report_is_one_self_contained_page(
    lastfm_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    results, _ = lastfm_run
    path = write_report(results, tmp_path / "report.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert page.problems == [] and page.open == []
    assert page.external == [] and not re.search(r"https?://", _XMLNS.sub("", text))
    assert not page.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert "url(" not in text and "@import" not in text
    assert {"table", "svg", "title"} <= page.tags
    for row, values in results["metrics"].items():
        cells = "".join(f"<td>{values[m]:.4f}</td>" for m in FULL_METRICS[1:])
        assert f"<b>{row}</b>" in text and cells in text, row
        assert f"<td>{values['ndcg@10']:.4f} <small>" in text, row
    for row, values in results["metrics_sampled"].items():
        cells = "".join(f"<td>{values[m]:.4f}</td>" for m in METRICS)
        assert cells in text, row
    assert "verified" in text and "FAILED" not in text


# -- generic CSV datasets ----------------------------------------------------------------------


def write_interactions(
    folder: Path, *, users: int, with_features: bool
) -> tuple[Path, Path | None]:
    """A small dataset in each CSV form: play counts without times, or typed events with Unix
    times and an item-features file (with items nobody touched)."""
    rng = random.Random(11)
    items = [f"item{n:03d}" for n in range(40)]
    rows = ["user_id,item_id,timestamp," + ("event_type" if with_features else "value")]
    for u in range(users):
        taste = rng.sample(items, 12)
        for k in range(14):
            item = taste[k % len(taste)] if k < 12 else rng.choice(items)
            if with_features:
                kind = "skip" if k >= 12 else rng.choice(("play", "complete", "like"))
                rows.append(f"user{u:02d},{item},{1_780_000_000 + 3_600 * (u + 17 * k)},{kind}")
            else:
                rows.append(f"user{u:02d},{item},,{rng.randint(1, 40)}")
    csv = folder / "interactions.csv"
    csv.write_text("\n".join(rows) + "\n")
    if not with_features:
        return csv, None
    features = folder / "items.csv"
    lines = ["item_id," + ",".join(f"f{d}" for d in range(ITEM_DIM))]
    for item in [*items, "extra1", "extra2", "extra3"]:
        lines.append(item + "," + ",".join(f"{rng.gauss(0, 1):.4f}" for _ in range(ITEM_DIM)))
    features.write_text("\n".join(lines) + "\n")
    return csv, features


@pytest.mark.parametrize("with_features", [False, True], ids=["counts", "events+features"])
def test_a_generic_csv_dataset_runs_end_to_end(tmp_path: Path, with_features: bool) -> None:
    csv, features = write_interactions(tmp_path, users=12, with_features=with_features)
    config = SimulationConfig(workdir=tmp_path / "sim", csv=csv, item_features=features,
                              users=12, **{**SMALL, "rounds": 1})  # fmt: skip
    results = simulate(config)
    items = {line.split(",")[1] for line in csv.read_text().splitlines()[1:]}
    if features is not None:  # the features' items join the catalog, touched or not
        items |= {line.split(",")[0] for line in features.read_text().splitlines()[1:]}
    assert results["dataset"] == "interactions" and results["items"] == len(items)
    check_results(results, users=12, rounds=1)
    assert (tmp_path / "sim" / "results.json").is_file()
    # Without features the item vectors are pooled co-occurrence: local_only says it is not
    # the device alone; with them it is.
    assert results["item_vectors"] == ("features" if with_features else "cooccurrence")
    assert ("note" in results["metrics"]["local_only"]) is (not with_features)
    assert (results["item_vectors_note"] is None) is with_features


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"users": 9}, "users must be at least 10"),
        ({"rounds": 0}, "rounds must be at least 1"),
        ({"sampling_rate": 0.0}, r"sampling_rate must be in \(0, 1\]"),
        ({"sampling_rate": 1.5}, r"sampling_rate must be in \(0, 1\]"),
        ({"collaborative_sampling_rate": 0.0}, r"collaborative_sampling_rate must be in \(0, 1\]"),
        ({"collaborative_sampling_rate": 1.2}, r"collaborative_sampling_rate must be in \(0, 1\]"),
    ],
)
def test_a_bad_config_is_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SimulationError, match=message) as caught:
        SimulationConfig(**change)
    assert caught.value.code == "simulation_invalid"


def test_a_missing_dataset_is_a_typed_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere") as caught:
        simulate(SimulationConfig(workdir=tmp_path / "sim", lastfm=missing, users=10))
    assert caught.value.code == "dataset_missing"
    with pytest.raises(DatasetError, match=r"none\.csv") as caught:
        simulate(SimulationConfig(workdir=tmp_path / "sim", csv=tmp_path / "none.csv"))
    assert caught.value.code == "dataset_missing"


def test_the_cli_names_a_missing_dataset(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sottovoce", "simulate", "--data", "/nonexistent",
               "--workdir", str(tmp_path / "sim"), "--users", "10"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done
    assert "dataset_missing" in done.stderr and "/nonexistent" in done.stderr
    assert "Traceback" not in done.stderr


# -- real aggregator processes -----------------------------------------------------------------


def test_a_run_against_aggregator_processes(tmp_path: Path) -> None:
    csv, _ = write_interactions(tmp_path, users=12, with_features=False)
    config = SimulationConfig(workdir=tmp_path / "sim", csv=csv, users=12, regions=("us",),
                              server=True, **{**SMALL, "rounds": 1})  # fmt: skip
    results = simulate(config)
    check_results(results, users=12, rounds=1)
    assert results["config"]["server"] is True
    for pipeline in (*PIPELINES, "collaborative"):
        assert results["rounds"][pipeline][0]["us"]["state"] == "published"
    logs = sorted((tmp_path / "sim" / "aggregators").glob("*/us-serve.log"))
    assert len(logs) == 3  # the reranker's two pipelines and the collaborative model
    for log in logs:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        routes = {line.get("route") for line in lines}
        assert {"/v1/round", "/v1/enroll", "/v1/rounds/{round_id}/deltas"} <= routes
        assert any(str(line.get("event")).startswith("Finished server process") for line in lines)
