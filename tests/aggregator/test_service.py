"""The service as operators run it: keys and config at the process edge, the round schedule,
and ``sottovoce aggregator serve`` as a real process (uvicorn on 127.0.0.1), killed and
restarted in the middle of a round, restarted past its deadline (its schedule then publishes
it), and taking a pending delta back (erasure) over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aggregator_helpers import EXPECTED, Clock, Keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sottovoce.policy import DecisionLog, policy_from_data
from sottovoce.sync import (
    ModelRelease,
    RoundSpec,
    SealedDelta,
    SignedRoundSpec,
    period_label,
    seal_delta,
    verify_round_spec,
)
from sottovoce.sync.transport import RetryPolicy, enroll, fetch_release, retract

pytest.importorskip("uvicorn")
pytest.importorskip("opacus")

from sottovoce._clock import NOW_ENV
from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._service import (
    DEV_PRIVACY,
    RegionKeys,
    RoundScheduler,
    ServiceConfig,
    ServiceConfigError,
    build_app,
    generate_keys,
    load_keys,
    policy_with_keys,
)

TOKEN = "operator-issued-token"
RETRY = RetryPolicy(attempts=3, initial=0.05, maximum=0.2)
COHORT = 4
DIM = 20_737  # the shipped ranker's parameters (checked against the model below)


# -- keys and config ------------------------------------------------------------------------


def test_generated_keys_load_back_are_private_to_the_owner_and_never_overwritten(
    tmp_path: Path,
) -> None:
    keys = generate_keys(tmp_path / "k")
    loaded = load_keys(tmp_path / "k")
    assert loaded.public() == keys.public()
    for name in ("signing.pem", "hpke.pem"):
        assert (tmp_path / "k" / name).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ServiceConfigError, match="refusing to replace"):
        generate_keys(tmp_path / "k")
    assert load_keys(tmp_path / "k").public() == keys.public()  # untouched


def test_bad_key_files_are_refused_with_the_file_named(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match=r"cannot read the key file .*signing\.pem"):
        load_keys(tmp_path)
    generate_keys(tmp_path / "k")
    (tmp_path / "k" / "hpke.pem").write_bytes((tmp_path / "k" / "signing.pem").read_bytes())
    with pytest.raises(ServiceConfigError, match=r"hpke\.pem must hold an X25519"):
        load_keys(tmp_path / "k")
    (tmp_path / "k" / "signing.pem").write_text("not a key")
    with pytest.raises(ServiceConfigError, match="not an unencrypted PEM"):
        load_keys(tmp_path / "k")


def test_a_policy_publishes_the_keys_of_one_region_only(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "k")
    base = Keys().policy()
    published = policy_with_keys(base, "eu", keys, "http://127.0.0.1:9000")
    eu, us = published.region("eu"), published.region("us")
    assert {k.key for k in eu.aggregator.public_keys} == set(keys.public().values())
    assert eu.aggregator.endpoint == "http://127.0.0.1:9000"
    assert us == base.region("us")
    assert published.hash != base.hash
    with pytest.raises(ServiceConfigError, match="no region 'mars'"):
        policy_with_keys(base, "mars", keys, None)


def _config(tmp_path: Path, keys: RegionKeys, **privacy: Any) -> dict[str, Any]:
    return {
        "policy": policy_with_keys(Keys().policy(**privacy), "eu", keys, None),
        "region": "eu",
        "keys": keys,
        "database": tmp_path / "a.db",
        "model_id": "ab" * 32,
        "base_weights": np.zeros(8, np.float32),
    }


def test_a_service_without_enrollment_tokens_or_with_bad_settings_does_not_start(
    tmp_path: Path,
) -> None:
    keys = generate_keys(tmp_path / "k")
    common = _config(tmp_path, keys)
    tokens = frozenset({TOKEN})
    with pytest.raises(ServiceConfigError, match="no enrollment token"):
        ServiceConfig(**common, enrollment_tokens=frozenset())
    # Less noise than the policy's least: devices would refuse every round.
    with pytest.raises(ServiceConfigError, match="below the policy's minimum of 1"):
        ServiceConfig(**common, enrollment_tokens=tokens, noise_multiplier=0.5)
    for setting in ({"round_seconds": 0}, {"sweep_seconds": -1}, {"max_body_bytes": 100}):
        with pytest.raises(ServiceConfigError, match="out of range"):
            ServiceConfig(**common, enrollment_tokens=tokens, **setting)
    # The mechanism is the policy's: no sampling rate to choose any more.
    with pytest.raises(TypeError, match="sampling_rate"):
        ServiceConfig(**common, enrollment_tokens=tokens, sampling_rate=0.01)  # type: ignore[call-arg]
    config = ServiceConfig(**common, enrollment_tokens=tokens)
    assert config.noise_multiplier is None  # the policy's, decided when a round opens
    build_app(config)  # one round of the policy's mechanism fits its budget
    assert ServiceConfig(**common, enrollment_tokens=tokens, noise_multiplier=3.0)


def test_a_service_whose_budget_cannot_pay_for_one_round_does_not_start(tmp_path: Path) -> None:
    # Every device in every round (q = 1) at z = 1 costs epsilon ~4.9 (PRV; RDP ~5.2): over a
    # budget of 4, no round could ever open; more noise makes one fit.
    keys = generate_keys(tmp_path / "k")
    common = _config(tmp_path, keys, sampling_rate=1.0, population=5)
    with pytest.raises(ServiceConfigError, match=r"one round costs epsilon 4\.9\d*.*budget of 4"):
        build_app(ServiceConfig(**common, enrollment_tokens=frozenset({TOKEN})))
    build_app(ServiceConfig(**common, enrollment_tokens=frozenset({TOKEN}), noise_multiplier=5.0))


# -- the round schedule ---------------------------------------------------------------------


def _aggregator(tmp_path: Path, clock: Clock, **privacy: Any) -> tuple[RegionAggregator, Keys]:
    keys = Keys()
    conn = sqlite3.connect(tmp_path / "agg.db", isolation_level=None)
    return keys.aggregator(conn, policy=keys.policy(**privacy), dim=8, clock=clock), keys


def test_the_scheduler_keeps_one_round_open_and_replaces_an_expired_one(tmp_path: Path) -> None:
    clock = Clock()
    agg, _ = _aggregator(tmp_path, clock)
    scheduler = RoundScheduler(noise_multiplier=None, round_seconds=600, clock=clock)
    first = scheduler.tick(agg)
    assert first["ended"] == [] and first["opened"]
    spec = agg.current_round()
    assert spec is not None and spec.spec.deadline == clock.now + timedelta(seconds=600)
    assert (spec.spec.noise_multiplier, spec.spec.expected_cohort) == (1.0, EXPECTED)
    assert scheduler.tick(agg, clock.now) == {"ended": []}  # one round at a time
    clock.now += timedelta(seconds=601)
    second = scheduler.tick(agg, clock.now)
    # The sweep ended the expired round: central, so it was published (with no delta at all);
    # the next round trains that release.
    assert second["ended"] == [first["opened"]]
    assert second["opened"] != first["opened"]
    ended = agg.round(first["opened"])
    assert ended is not None and ended.state == "published"
    release = agg.latest_release()
    assert release is not None and release.version == 1
    current = agg.current_round()
    assert current is not None and current.spec.round_id == second["opened"]
    assert current.spec.model_version == 1
    # A scheduler with more noise than the policy's least opens rounds with it.
    clock.now += timedelta(seconds=601)
    noisier = RoundScheduler(noise_multiplier=2.0, round_seconds=600).tick(agg, clock.now)
    opened = agg.current_round()
    assert opened is not None and opened.spec.round_id == noisier["opened"]
    assert opened.spec.noise_multiplier == 2.0


def test_a_budget_refusal_is_logged_once_and_the_scheduler_waits_for_the_next_period(
    tmp_path: Path,
) -> None:
    clock = Clock()
    # Every device in every round (q = 1): one round of z = 1 costs more than epsilon 1.
    agg, _ = _aggregator(tmp_path, clock, epsilon=1.0, sampling_rate=1.0, population=5)
    scheduler = RoundScheduler(noise_multiplier=None, round_seconds=600)
    did = scheduler.tick(agg, clock.now)
    assert did["budget_exhausted"] is True
    for _ in range(5):
        clock.now += timedelta(minutes=10)
        assert "budget_exhausted" not in scheduler.tick(agg, clock.now)
    refusals = [d for _, d in agg.log.query() if d.action == "open_round" and d.outcome == "deny"]
    assert [d.reason for d in refusals] == ["budget_exhausted"]
    period = agg.ledger.region.privacy.period
    clock.now = agg.ledger.period_start_for(clock.now) + period
    assert scheduler.tick(agg, clock.now)["budget_exhausted"] is True  # asks again, once


# -- `sottovoce aggregator serve`, a real process ------------------------------------------


class Server:
    """``sottovoce aggregator serve`` in a child process on a free loopback port."""

    def __init__(
        self, tmp_path: Path, keys: RegionKeys, policy_file: Path, *, options: tuple[str, ...] = ()
    ) -> None:
        self.tmp_path, self.keys, self.policy_file = tmp_path, keys, policy_file
        self.options = options  # more ``serve`` options (they win over the defaults here)
        self.db = tmp_path / "aggregator-eu.db"
        self.logs = tmp_path / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.client = httpx.Client(timeout=10.0)

    def start(self, *, now: datetime | None = None) -> None:
        """Start serving (on the wall clock, or on a clock started at ``now``: SOTTOVOCE_NOW);
        returns once the service is up with a round open."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "sottovoce", "aggregator", "serve", "--region", "eu",
                   "--policy", str(self.policy_file), "--keys", str(self.tmp_path / "keys"),
                   "--db", str(self.db), "--port", str(port), "--sweep-seconds", "0.5",
                   "--round-minutes", "30", *self.options]  # fmt: skip
        env = {**os.environ, "SOTTOVOCE_ENROLLMENT_TOKENS": f"other,{TOKEN}"}
        env.pop(NOW_ENV, None)
        if now is not None:
            env[NOW_ENV] = now.isoformat()
        with self.logs.open("ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs.read_text()
            try:
                health = self.client.get(f"{self.url}/v1/health")
                if health.status_code == 200 and health.json()["open_round"]:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the service did not start:\n{self.logs.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def spec(self) -> RoundSpec:
        answer = self.client.get(f"{self.url}/v1/round")
        assert answer.status_code == 200, answer.text
        return verify_round_spec(
            SignedRoundSpec.from_wire(answer.content), self.keys.signing.public_key()
        )

    def upload(self, sealed: SealedDelta, body: bytes | None = None) -> httpx.Response:
        return self.client.post(
            f"{self.url}/v1/rounds/{sealed.round_id}/deltas",
            content=sealed.to_wire() if body is None else body,
            headers={"Idempotency-Key": sealed.idempotency_key,
                     "Content-Type": "application/json"},
        )  # fmt: skip

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def model() -> tuple[str, np.ndarray]:
    from sottovoce.device import Ranker

    ranker = Ranker.load()
    return ranker.model_id, ranker.get_weights()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    keys = generate_keys(tmp_path / "keys")
    data = policy_with_keys(Keys().policy(), "eu", keys, None).model_dump(mode="json")
    data["regions"][0]["privacy"]["min_cohort"] = COHORT
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(data))
    assert policy_from_data(data).region("eu").privacy.min_cohort == COHORT
    svc = Server(tmp_path, keys, policy_file)
    svc.start()
    yield svc
    svc.stop()
    svc.client.close()


def _device(server: Server, spec: RoundSpec) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    enroll(server.client, base_url=server.url, token=TOKEN, device_public_key=key.public_key(),
           period=period_label(spec), retry=RETRY)  # fmt: skip
    return key


def _delta(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=DIM)
    return (values / np.linalg.norm(values) * 0.5).astype(np.float32)


def _seal(server: Server, spec: RoundSpec, key: Ed25519PrivateKey, seed: int) -> SealedDelta:
    return seal_delta(
        delta=_delta(seed),
        spec=spec,
        device_secret=hashlib.sha256(key.private_bytes_raw()).digest(),
        signing_key=key,
        aggregator_hpke_key=server.keys.hpke.public_key(),
        rng=np.random.default_rng(seed),
    )


def test_a_restart_in_the_middle_of_a_round_loses_nothing_and_counts_nothing_twice(
    server: Server, model: tuple[str, np.ndarray]
) -> None:
    model_id, base = model
    assert base.shape == (DIM,)
    spec = server.spec()
    assert spec.model_id == model_id and spec.min_cohort == COHORT
    assert spec.expected_cohort == EXPECTED
    sealed = [_seal(server, spec, _device(server, spec), seed) for seed in range(COHORT)]
    first, rest = sealed[: COHORT // 2], sealed[COHORT // 2 :]
    assert [server.upload(s).status_code for s in first] == [200, 200]

    server.kill()  # SIGKILL: no shutdown hook runs
    server.start()
    assert server.spec() == spec  # the same round, resumed from the SQLite file
    # Devices that never heard their answer retry: same key, same body, the first answer.
    assert [server.upload(s).json()["code"] for s in first] == ["within_policy"] * 2
    assert server.rows("SELECT count FROM rounds WHERE round_id = ?", spec.round_id) == [(2,)]
    assert [server.upload(s).status_code for s in rest] == [200, 200]
    # The whole cohort is in; a central round still waits for its deadline.
    assert server.rows("SELECT state, count FROM rounds WHERE round_id = ?",
                       spec.round_id) == [("open", COHORT)]  # fmt: skip
    no_release = server.client.get(f"{server.url}/v1/model/release")
    assert (no_release.status_code, no_release.json()["code"]) == (404, "no_release")

    # Stopped over the deadline: started again, the schedule's first pass publishes the round
    # and opens the next one.
    server.stop()
    server.start(now=spec.deadline)
    release = _wait_for_release(server, model_id)
    assert release.version == 1
    accepted = server.rows(
        "SELECT idempotency_key FROM contributions WHERE round_id = ? AND status = 200",
        spec.round_id,
    )
    assert sorted(k for (k,) in accepted) == sorted(s.idempotency_key for s in sealed)
    assert server.rows("SELECT state, count FROM rounds WHERE round_id = ?",
                       spec.round_id) == [("published", COHORT)]  # fmt: skip
    assert server.rows("SELECT count(*) FROM round_partials") == [(0,)]  # no un-noised sum left
    # The release moved the weights by the sum over the expected cohort (norm <= 4 * 0.5 / 5)
    # plus the OS CSPRNG's discrete Gaussian noise: std z·C/expected per value, whatever the
    # count (over COHORT instead, it would be 25% larger).
    moved = release.weights_array().astype(np.float64) - base
    total = np.sum([_delta(seed) for seed in range(COHORT)], axis=0)
    noise = moved - total / EXPECTED
    std = spec.noise_multiplier * spec.clipping_norm / EXPECTED
    assert float(noise.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(noise.mean())) < 5 * std / np.sqrt(DIM)
    # The schedule opened the next round, on version 1.
    assert server.spec().model_version == 1
    server.stop()
    log = DecisionLog(sqlite3.connect(server.db))
    assert log.verify().ok
    reasons = [(d.action, d.reason) for _, d in log.query()]
    assert reasons.count(("accept_delta", "within_policy")) == COHORT
    assert [r for r in reasons if r[0] == "publish_release"] == [
        ("publish_release", "deadline_reached")]  # fmt: skip


def _wait_for_release(server: Server, model_id: str) -> ModelRelease:
    deadline = time.monotonic() + 30
    while server.client.get(f"{server.url}/v1/model/release").status_code == 404:
        assert time.monotonic() < deadline, "no release after the deadline"
        time.sleep(0.1)
    fetched = fetch_release(server.client, base_url=server.url,
                            verify_key=server.keys.signing.public_key(), model_id=model_id,
                            current_version=0, retry=RETRY)  # fmt: skip
    assert fetched is not None
    return fetched.release


def test_logs_are_json_lines_without_raw_paths(server: Server) -> None:
    spec = server.spec()
    key = _device(server, spec)
    sealed = _seal(server, spec, key, 1)
    assert server.upload(sealed).status_code == 200
    assert retract(server.client, base_url=server.url, sealed=sealed, retry=RETRY)
    server.stop()
    lines = [ln for ln in server.logs.read_text().splitlines() if ln.startswith("{")]
    entries = [json.loads(line) for line in lines]
    requests = [e for e in entries if e["event"] == "request"]
    assert {"/v1/rounds/{round_id}/deltas", "/v1/pseudonyms/{pseudonym}/erasure"} <= {
        e["route"] for e in requests
    }
    assert all({"ts", "level", "status", "ms"} <= e.keys() for e in requests)
    assert any(e["event"] == "schedule" and e.get("opened") for e in entries)
    text = server.logs.read_text()
    assert sealed.pseudonym not in text and sealed.idempotency_key not in text


def test_a_device_takes_its_pending_delta_back_and_it_cannot_come_back(server: Server) -> None:
    spec = server.spec()
    keys = [_device(server, spec) for _ in range(2)]
    kept, taken = _seal(server, spec, keys[0], 1), _seal(server, spec, keys[1], 2)
    assert server.upload(kept).status_code == 200
    assert server.upload(taken).status_code == 200
    count = "SELECT count FROM rounds WHERE round_id = ?"
    assert server.rows(count, spec.round_id) == [(2,)]

    assert retract(server.client, base_url=server.url, sealed=taken, retry=RETRY) is True
    assert server.rows(count, spec.round_id) == [(1,)]
    assert server.rows("SELECT count(*) FROM contributions WHERE pseudonym = ?",
                       taken.pseudonym) == [(0,)]  # fmt: skip
    # A stray retry of the upload does not put it back; a second erasure finds nothing.
    again = server.upload(taken)
    assert (again.status_code, again.json()["code"]) == (410, "erased")
    assert retract(server.client, base_url=server.url, sealed=taken, retry=RETRY) is False
    # Someone else's pseudonym in the path, or a body that is not a sealed delta: refused.
    json_body = {"Content-Type": "application/json"}
    wrong = server.client.post(f"{server.url}/v1/pseudonyms/{kept.pseudonym}/erasure",
                               content=taken.to_wire(), headers=json_body)  # fmt: skip
    assert (wrong.status_code, wrong.json()["code"]) == (400, "malformed")
    junk = server.client.post(f"{server.url}/v1/pseudonyms/x/erasure", content=b"{}",
                              headers=json_body)  # fmt: skip
    assert (junk.status_code, junk.json()["code"]) == (400, "malformed")
    assert server.rows(count, spec.round_id) == [(1,)]
    server.stop()
    log = DecisionLog(sqlite3.connect(server.db))
    erasures = [(d.outcome, d.reason) for _, d in log.query() if d.action == "erase"]
    assert erasures == [("allow", "user_request"), ("deny", "nothing_pending"),
                        ("deny", "malformed")]  # fmt: skip
    assert log.verify().ok


def test_an_oversized_upload_is_refused_unread_and_logged(server: Server) -> None:
    spec = server.spec()
    answer = server.client.post(
        f"{server.url}/v1/rounds/{spec.round_id}/deltas",
        content=b"x" * (2 << 20),
        headers={"Idempotency-Key": "k" * 20, "Content-Type": "application/json"},
    )
    assert (answer.status_code, answer.json()["code"]) == (413, "too_large")
    # Any other route too, before the body is parsed (or the token checked).
    enroll_answer = server.client.post(f"{server.url}/v1/enroll", content=b"{" * (2 << 20))
    assert (enroll_answer.status_code, enroll_answer.json()["code"]) == (413, "too_large")
    server.stop()
    log = DecisionLog(sqlite3.connect(server.db))
    assert [d.reason for _, d in log.query() if d.action == "accept_delta"] == ["too_large"]


def test_serve_refuses_keys_the_policy_does_not_publish(tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys")
    policy = tmp_path / "policy.json"
    policy.write_text(Keys().policy().model_dump_json())  # publishes other keys
    done = subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "serve", "-r", "eu", "-p", str(policy),
         "--keys", str(tmp_path / "keys"), "--db", str(tmp_path / "a.db"), "--port", "9"],
        env={**os.environ, "SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "config_invalid" in done.stderr and "not one of region eu's keys" in done.stderr


def test_keygen_then_serve_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "eu"
    done = subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "keygen", "--region", "eu", "--out",
         str(out), "--endpoint", "http://127.0.0.1:8123"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "policy.json" in done.stdout
    keys = load_keys(out)
    published = policy_from_data(json.loads((out / "policy.json").read_text()))
    eu = published.region("eu")
    assert {k.key for k in eu.aggregator.public_keys} == set(keys.public().values())
    again = subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "keygen", "-r", "eu", "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert again.returncode == 2 and "refusing to replace" in again.stderr
    assert load_keys(out).public() == keys.public()


def test_keygen_refuses_an_endpoint_ending_in_v1_before_writing_a_key(tmp_path: Path) -> None:
    out = tmp_path / "eu"
    done = subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "keygen", "-r", "eu", "--out", str(out),
         "--endpoint", "http://127.0.0.1:8123/v1"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "400"},  # the error box on one line
    )  # fmt: skip
    assert done.returncode == 2 and "ends in /v1" in done.stderr
    assert "'http://127.0.0.1:8123'" in done.stderr  # what to use instead
    assert not out.exists()


def test_keygen_with_the_dev_profile_writes_a_policy_for_a_few_devices(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "keygen", "-r", "eu", "--out", str(out),
         "--profile", "dev"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    privacy = policy_from_data(json.loads((out / "policy.json").read_text())).region("eu").privacy
    assert (privacy.population, privacy.sampling_rate, privacy.min_cohort,
            privacy.noise_multiplier, privacy.delta) == (3, 1.0, 2, 2.0, 0.01)  # fmt: skip
    assert {key: getattr(privacy, key) for key in DEV_PRIVACY} == DEV_PRIVACY
    assert privacy.expected_cohort == 3.0  # every device, every round
    # A service on it starts: one round of its mechanism fits the region's budget.
    config = ServiceConfig(policy=policy_from_data(json.loads((out / "policy.json").read_text())),
                           region="eu", keys=load_keys(out), database=tmp_path / "a.db",
                           model_id="ab" * 32, base_weights=np.zeros(8, np.float32),
                           enrollment_tokens=frozenset({TOKEN}))  # fmt: skip
    build_app(config)
    wrong = subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "keygen", "-r", "eu", "--out",
         str(tmp_path / "x"), "--profile", "staging"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert wrong.returncode == 2 and not (tmp_path / "x" / "signing.pem").exists()


def test_a_dev_service_publishes_its_short_rounds_on_its_own(
    tmp_path: Path, model: tuple[str, np.ndarray]
) -> None:
    """``keygen --profile dev`` and ``serve --profile dev`` (rounds shortened further here):
    nobody closes the round; the service's schedule publishes it once its deadline passes."""
    model_id, base = model
    subprocess.run(
        [sys.executable, "-m", "sottovoce", "aggregator", "keygen", "-r", "eu", "--out",
         str(tmp_path / "keys"), "--profile", "dev"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    server = Server(tmp_path, load_keys(tmp_path / "keys"), tmp_path / "keys" / "policy.json",
                    options=("--profile", "dev", "--round-minutes", "0.15"))  # fmt: skip
    server.start()
    try:
        spec = server.spec()
        assert (spec.sampling_rate, spec.expected_cohort, spec.noise_multiplier,
                spec.min_cohort) == (1.0, 3.0, 2.0, 2)  # fmt: skip
        ((opened,),) = server.rows("SELECT opened_at FROM rounds WHERE round_id = ?",
                                   spec.round_id)  # fmt: skip
        length = (spec.deadline - datetime.fromisoformat(opened)).total_seconds()
        assert length == pytest.approx(9.0, abs=0.5)  # 0.15 minutes (the schedule's own clock)
        sealed = [_seal(server, spec, _device(server, spec), seed) for seed in range(2)]
        assert [server.upload(s).status_code for s in sealed] == [200, 200]
        release = _wait_for_release(server, model_id)  # a sweep every 2 s (dev) ends it
        assert release.version == 1
        assert server.rows("SELECT state, count FROM rounds WHERE round_id = ?",
                           spec.round_id) == [("published", 2)]  # fmt: skip
        moved = release.weights_array().astype(np.float64) - base
        noise = moved - np.sum([_delta(seed) for seed in range(2)], axis=0) / 3.0
        assert float(noise.std()) == pytest.approx(2.0 / 3.0, rel=0.03)  # z·C / expected
    finally:
        server.stop()
        server.client.close()


def test_serve_has_no_sampling_rate_to_choose_and_knows_its_profiles(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "sottovoce", "aggregator", "serve", "-r", "eu", "-p",
            str(tmp_path / "policy.json"), "--keys", str(tmp_path / "keys")]  # fmt: skip
    for extra, message in ((["--sampling-rate", "0.01"], "No such option"),
                           (["--profile", "staging"], "'prod' or 'dev'")):  # fmt: skip
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60,
                              check=False, env={**os.environ, "SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN,
                                                "COLUMNS": "200"})  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert message in done.stderr, done.stderr
