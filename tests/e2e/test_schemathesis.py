"""Property-based run of schemathesis over the served `/openapi.json` of a real `miren serve`.

Driven programmatically (not through the schemathesis pytest plugin, whose lazy schemas do not mix
well with a subprocess fixture): for every operation, schema-valid (positive) and schema-invalid
(negative) requests from a bounded, derandomized Hypothesis run, authenticated with the token.
Each response must not be a 5xx, must have a documented status and content type, and must match
the documented schema. Two passes: random path parameters (mostly unknown apps: the 404 paths),
then path parameters fixed to a seeded app with an active version, a preview and a route, so the
deploy, version and preview handlers see real state. Every failure is collected (one per operation
and mode, shrunk by Hypothesis) and reported together with schemathesis' own message, which names
the check, shows the response and gives a `curl` line to reproduce it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.edge import DEAD_UPSTREAM, TOKEN, MirenServer

EXAMPLES_PER_OPERATION = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"runtime": "upstream", "urls": [DEAD_UPSTREAM]}


@pytest.fixture(scope="module")
def fuzz_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    """A server of its own: the run creates and deletes apps, routes and default routes."""
    with MirenServer(tmp_path_factory.mktemp("fuzz"), store="memory", token=TOKEN) as server:
        yield server


def seed(edge: MirenServer) -> dict[str, str]:
    """App `fuzz` with an active version, preview `pr-1` and route `fuzz.example.com`."""
    assert edge.admin("POST", "/v1/apps", {"name": "fuzz"}).status == 201
    active = edge.admin("POST", "/v1/apps/fuzz/deploys", {"spec": SPEC}).json()
    preview = {"spec": SPEC, "ephemeral": {"label": "pr-1", "ttl": "1h"}}
    assert edge.admin("POST", "/v1/apps/fuzz/deploys", preview).status == 201
    assert edge.admin("PUT", "/v1/routes/fuzz.example.com", {"app": "fuzz"}).status == 201
    # `id` is the active version's: GET shows it, DELETE must be 409, and it stays for later cases.
    return {
        "app": "fuzz",
        "label": "pr-1",
        "id": active["version"]["id"],
        "host": "fuzz.example.com",
    }


def has_inputs(operation: Any) -> bool:
    return bool(
        list(operation.path_parameters)
        or list(operation.query)
        or list(operation.headers)
        or operation.body
    )


def run_operation(
    operation: Any,
    mode: GenerationMode,
    session: requests.Session,
    path_parameters: dict[str, str] | None,
) -> str | None:
    """One bounded Hypothesis run; the failure as text, or None."""
    names = {p.name for p in operation.path_parameters}
    fixed = {k: v for k, v in (path_parameters or {}).items() if k in names} or None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        case.call_and_validate(session=session, headers=AUTH, checks=CHECKS, timeout=10)

    try:
        check()
    except Unsatisfiable:
        # Nothing to make invalid (no parameters, no body, no security: /healthz, /metrics).
        if mode is GenerationMode.NEGATIVE and not has_inputs(operation):
            return None
        raise
    # schemathesis' FailureGroup derives from BaseExceptionGroup, not from Exception.
    except (Exception, BaseExceptionGroup) as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        return f"{operation.label} [{mode.value}]:\n{exc}\n{notes}".rstrip()
    return None


def test_openapi_document_holds_under_fuzzing(fuzz_edge: MirenServer, tmp_path: Path) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_edge.admin_url}/openapi.json", timeout=10)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation of the document is invalid: {result!r}"
        operations.append(result.ok())
    assert len(operations) >= 17, [op.label for op in operations]
    failures: list[str] = []
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if (failure := run_operation(op, mode, session, None)) is not None:
                    failures.append(failure)
        fixed = seed(fuzz_edge)
        for op in operations:
            if op.label == "DELETE /v1/apps/{app}":
                continue  # would delete the seeded app for the rest of the pass
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if (failure := run_operation(op, mode, session, fixed)) is not None:
                    failures.append(f"(seeded) {failure}")
    assert not failures, f"{len(failures)} failing operation(s):\n\n" + "\n\n".join(failures)
    health = fuzz_edge.admin("GET", "/healthz")
    assert health.status == 200, health
