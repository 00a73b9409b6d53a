"""schemathesis against the running router's own OpenAPI document (GET /openapi.json, `serving/edge/openapi.py`):
requests generated from the schema, valid ones (positive) and ones that break it (negative), sent through
Ray Serve's proxy to two router replicas and real vLLM engines. Every answer must be no 5xx, carry a
status the document declares, with a declared content type, a body that matches its schema and the
headers it declares (x-served-variant, Retry-After on a 429).

The stack's limits are lowered for the run (max_tokens 4) and the document says so: the generated requests
stay within them, so every accepted one costs the CPU engines a few tokens at most."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import BASE, Stack, apply_config
from tests.integration.test_reliability import apply_limits, record

pytestmark = pytest.mark.integration

# The stack's own key that may pin a variant: x-variant is fuzzed too (fp16/int8 served, awq forbidden, others 404).
KEY = {"authorization": "Bearer test-premium-admin"}
# 5xx are judged in `send`: any is a failure except a clear, declared 503 of an engine that is briefly
# unavailable or full, which is counted instead (at most MAX_TRANSIENT): one `variant_unavailable` was seen in one
# fresh-clone CI run, whose log was not kept; the two-router fix in serving/variants/client.py may have been its cause.
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Examples per operation and generation mode; the probes take no input, one request each.
EXAMPLES = {
    "POST /v1/chat/completions": 200,
    "POST /v1/completions": 200,
    "GET /v1/models": 20,
    "POST /v1/feedback": 60,
}
MAX_TOKENS = 4


TRANSIENT = {"variant_unavailable", "engine_overloaded"}
MAX_TRANSIENT = 5


def transient(answer: Any) -> bool:
    """A 503 with the OpenAI error body saying an engine is briefly unavailable or full: clear and retryable."""
    try:
        return answer.status_code == 503 and answer.json()["error"]["code"] in TRANSIENT
    except (ValueError, KeyError, TypeError):
        return False


def fuzz(
    operation: Any,
    mode: schemathesis.GenerationMode,
    statuses: Counter[str],
    codes: Counter[str],
    failures: dict[str, str],
) -> None:
    """Sends `EXAMPLES` generated requests for one operation, counting statuses and error codes, and keeping
    each distinct failure."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES.get(operation.label, 1),
        deadline=None,
        database=None,
        # The same examples on every run unless SERVING_FUZZ_EXPLORE is set: a CI run must not fail on inputs the
        # previous run never tried (exploring runs find new ones; each found is fixed and kept as a unit test).
        derandomize=not os.environ.get("SERVING_FUZZ_EXPLORE"),
        phases=[Phase.generate],  # no shrinking: each failure is kept as found, with its curl line
        suppress_health_check=list(HealthCheck),
    )
    def send(case: Any) -> None:
        try:
            answer = case.call_and_validate(base_url=BASE, headers=KEY, checks=CHECKS, timeout=120)
        except Exception as exc:  # a failed check: kept, and the run goes on to find the others
            statuses[f"{operation.label} failed"] += 1
            failures.setdefault(str(exc).splitlines()[0], str(exc)[:3000])
            return
        statuses[f"{operation.label} {answer.status_code}"] += 1
        if answer.status_code >= 500 and not transient(answer):
            failures.setdefault(f"{operation.label} {answer.status_code}: server error", answer.text[:500])
        elif answer.status_code >= 400:
            try:
                codes[f"{answer.status_code} {answer.json()['error']['code']}"] += 1
            except (ValueError, KeyError, TypeError):  # not the OpenAI error body: a failure, kept like the others
                failures.setdefault(f"{operation.label} {answer.status_code}: not an OpenAI error", answer.text[:500])

    send()


def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_document(stack: Stack) -> None:
    apply_limits(stack, max_tokens=MAX_TOKENS, default_max_tokens=MAX_TOKENS)
    try:
        document = httpx.get(f"{BASE}/openapi.json", timeout=30).json()
        schema = schemathesis.openapi.from_dict(document)
        statuses: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        failures: dict[str, str] = {}
        started = time.monotonic()
        for found in schema.get_all_operations():
            assert isinstance(found, Ok), found  # the document itself is valid OpenAPI
            operation = found.ok()
            assert operation.label in EXAMPLES or operation.path in ("/health", "/ready"), operation.label
            fuzz(operation, schemathesis.GenerationMode.POSITIVE, statuses, codes, failures)
            if operation.label in EXAMPLES:  # the probes have no input to break
                fuzz(operation, schemathesis.GenerationMode.NEGATIVE, statuses, codes, failures)
        took = time.monotonic() - started
    finally:
        assert apply_config(stack).returncode == 0  # the stack's starting config again
    sent = sum(statuses.values())
    print(f"schemathesis: {sent} requests in {took:.0f} s: {dict(sorted(statuses.items()))}")
    print(f"schemathesis: error codes: {dict(codes.most_common())}")
    record(
        f"schemathesis: requests generated from the OpenAPI document ({sent} in {took:.0f} s)",
        [key.rsplit(" ", 1)[-1] for key, count in statuses.items() for _ in range(count)],
    )
    assert not failures, "\n\n".join(failures.values())
    unavailable = sum(n for key, n in codes.items() if key.startswith("503 "))
    assert unavailable <= MAX_TRANSIENT, codes  # a rare transient 503, not a broken engine
    assert statuses["POST /v1/chat/completions 200"] > 0
    assert statuses["POST /v1/completions 200"] > 0
    assert statuses["POST /v1/chat/completions 400"] > 0  # the negative ones really were refused
