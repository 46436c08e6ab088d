"""Schema-driven fuzzing of the aggregator's HTTP API, over a real uvicorn on 127.0.0.1.

schemathesis reads the service's own ``/openapi.json`` from the running server and sends
requests generated from it, valid and invalid (wrong types, missing fields, odd headers), to
every operation. Whatever it sends, the service must not fail (no 5xx) and must refuse in its
own shape: every 4xx body is a JSON object ``{"code", "message"}``. Valid uploads are made
device-like (see :func:`device_like`) so they reach the aggregator's decisions, not only the
parser; enrollment is tried as sent and again with the app's real token.

The schema is loaded in a fixture (the server's port is known only then) and each operation's
``as_strategy()`` runs under Hypothesis: schemathesis' lazy pytest loader
(``schemathesis.pytest.from_fixture``) fails on pytest 9 (it sets ``Node._nodeid``, which
pytest 9 no longer has). Generation is derandomized and bounded, so a run is repeatable and
stays well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import re
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from service_helpers import TOKEN, Device, Region, serve

from sottovoce.aggregator import RegionAggregator, create_app
from sottovoce.sync import period_label

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("opacus")

from schemathesis import BaseSchema, Case, GenerationMode, Response  # noqa: E402

EXAMPLES = 40  # per operation and generation mode
CODE = re.compile(r"^[a-z][a-z_]*$")


@dataclass(frozen=True)
class Target:
    """What a device would know: the open round and an enrolled key."""

    round_id: str
    device_key: str
    period: str


@dataclass(frozen=True)
class Served:
    url: str
    target: Target


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # A central round stays open until its deadline, whatever its count, and the clock never
    # gets there (nothing sweeps either): the round stays open throughout.
    region = Region(tmp_path_factory.mktemp("fuzz") / "aggregator.db")
    with serve(region.app()) as url, httpx.Client() as client:
        device = Device()
        device.enroll(client, url, region.spec)
        target = Target(region.spec.round_id, device.public_b64, period_label(region.spec))
        yield Served(url, target)


@pytest.fixture(scope="module")
def aggregator_api(aggregator: Served) -> BaseSchema:
    # The document the running server serves, and requests to that server.
    schema: BaseSchema = schemathesis.openapi.from_url(f"{aggregator.url}/openapi.json")
    return schema


def _unused() -> RegionAggregator:
    raise AssertionError("the app is only asked for its OpenAPI document here")


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Every operation with valid inputs; with invalid ones too where it has inputs that can be
    made invalid (a body or a path parameter: a bare header string has no invalid form)."""
    paths = create_app(_unused, enrollment_tokens=set()).openapi()["paths"]
    cases = []
    for path, item in sorted(paths.items()):
        for method, operation in sorted(item.items()):
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            in_path = any(p.get("in") == "path" for p in operation.get("parameters", []))
            if "requestBody" in operation or in_path:
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


# Collected from the app's own document (no server needed to name the tests); the first test
# checks that the running server's document has exactly these operations.
CASES = _operations()


def test_every_served_operation_is_fuzzed(aggregator_api: BaseSchema) -> None:
    operations = [result.ok() for result in aggregator_api.get_all_operations()]  # type: ignore[union-attr]
    served = sorted((op.method.upper(), op.path) for op in operations)
    assert served == sorted({(method, path) for method, path, _ in CASES})


def check(case: Case[Any], response: Response) -> None:
    """No server error; a refusal is a ``{"code", "message"}`` object with a stable code."""
    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
    where += f"\n{case.as_curl_command()}"
    assert response.status_code < 500, f"server error: {where}\n{response.text[:500]}"
    if 400 <= response.status_code < 500:
        try:
            problem = response.json()
        except ValueError:
            pytest.fail(f"a refusal that is not JSON: {where}\n{response.text[:500]}")
        assert isinstance(problem, dict), f"{where}\n{problem!r}"
        assert set(problem) == {"code", "message"}, f"{where}\n{problem!r}"
        assert isinstance(problem["code"], str) and CODE.match(problem["code"]), where
        assert isinstance(problem["message"], str) and problem["message"], where


def device_like(case: Case[Any], target: Target) -> Case[Any]:
    """A valid case pushed deeper, as a real device's upload would be: the protocol version it
    speaks, binary fields that decode to their sizes, often the service's region, open round
    and an enrolled key, and the path and headers agreeing with the body. It then gets past
    the parsing and cross-checks to the aggregator's own decisions (region, enrollment, round,
    decryption). Choices come from a hash of the generated body, so they are repeatable."""
    if not isinstance(case.body, dict) or "ciphertext" not in case.body:
        return case
    body = dict(case.body)
    seed = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).digest()

    def raw(field: str, size: int) -> str:
        digest = hashlib.sha256(f"{field}/{body[field]}".encode()).digest()
        return b64encode((digest * (size // 32 + 1))[:size]).decode()

    body |= {"protocol": 1, "device_key": raw("device_key", 32), "enc": raw("enc", 32),
             "ciphertext": raw("ciphertext", 32 * (1 + seed[0] % 4) + 16),
             "idempotency_key": seed.hex()[:32]}  # fmt: skip
    if seed[1] % 4:
        body["region"] = "eu"
    if seed[2] % 2:
        body |= {"device_key": target.device_key, "period": target.period,
                 "round_id": target.round_id, "model_version": 0}  # fmt: skip
    case.body = body
    for parameter in ("round_id", "pseudonym"):
        if parameter in (case.path_parameters or {}) and isinstance(body.get(parameter), str):
            case.path_parameters[parameter] = body[parameter]
    if case.path == "/v1/rounds/{round_id}/deltas":
        case.headers["Idempotency-Key"] = body["idempotency_key"]  # case-insensitive mapping
    return case


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[" ".join(c) for c in CASES])
def test_no_server_errors_and_every_refusal_is_a_coded_problem(
    aggregator: Served, aggregator_api: BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = aggregator_api[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(lambda case: device_like(case, aggregator.target))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def fuzz(case: Case[Any]) -> None:
        check(case, case.call(timeout=10))
        if path == "/v1/enroll":
            check(case, case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10))

    fuzz()
