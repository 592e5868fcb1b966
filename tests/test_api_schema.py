"""The API against its own OpenAPI schema, property-based (schemathesis, on hypothesis): for any input the
schema allows, and many it refuses, no endpoint answers 5xx, every status is one the schema documents,
and every response body matches its documented schema. Run with an admin's token holding every scope,
so every endpoint gets past authentication, on a campaign with pairs, a lease and a round."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction
from hypothesis import HealthCheck, settings

from annotate.actions import claim_next_pair
from api.actions import create_token
from pairloop.wsgi import application
from tests.conftest import make_campaign
from training.actions import launch_round
from training.config import build_config

schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", application)
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.specs.openapi.checks.status_code_conformance,
    schemathesis.specs.openapi.checks.content_type_conformance,
    schemathesis.specs.openapi.checks.response_schema_conformance,
]


@pytest.fixture
def connection_kept():
    """The WSGI handler closes the database connection after each request, and with it the test's
    transaction; Django's test client keeps it open the same way."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    yield
    for signal in (request_started, request_finished):
        signal.connect(close_old_connections)


@pytest.fixture
def world(db, connection_kept, admin_user, labeler, monkeypatch, settings, tmp_path):
    """An admin's token with every scope, and the ids of a campaign, the admin's lease and a round."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 0}
    settings.DATA_DIR = tmp_path  # uploads the examples make are left here, not in the data directory
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)  # no broker: the rows suffice
    campaign = make_campaign(n_pairs=3, members=[labeler, admin_user])
    assignment = claim_next_pair(campaign, admin_user).assignment
    round_ = launch_round(campaign, admin_user, build_config("tiny", {}))
    return {"headers": {"Authorization": f"Bearer {create_token(admin_user, 'schemathesis')[1]}"},
            "paths": {"slug": campaign.slug, "assignment_id": assignment.pk, "round_id": round_.pk,
                      "job_id": round_.jobs.order_by("order").first().pk}}


EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def call(case, world):
    with transaction.atomic():  # every example starts from the same rows
        case.call_and_validate(headers=world["headers"], checks=CHECKS)
        transaction.set_rollback(True)


@pytest.mark.slow
@pytest.mark.django_db
@schema.parametrize()
@EXAMPLES
def test_no_input_the_schema_allows_makes_a_server_error(case, world):
    call(case, world)


@pytest.mark.slow
@pytest.mark.django_db
@schema.parametrize()
@EXAMPLES
def test_no_body_or_query_makes_a_server_error_on_real_rows(case, world):
    """The same with the path naming rows that exist, so the bodies and queries reach the actions."""
    if case.path_parameters:
        case.path_parameters = {**case.path_parameters,
                                **{k: v for k, v in world["paths"].items() if k in case.path_parameters}}
    call(case, world)
