"""Who gets what from every URL: each pattern in the URLconf x five personas x GET and POST, against
a table of the status each one must get. The patterns come from the resolver, so a new URL without
a row fails here, with the row to add; a row whose URL is gone fails too.

A labeler asking for what is not theirs gets 404 (its existence is not confirmed); anonymous users
are sent to the login page; the admin site sends everyone but staff to its own login page. The HTTP
API (/api/v1/) takes Bearer tokens, never the session cookie: every persona's browser gets 401 there
(and so no CSRF token is needed, nor checked: a forged form carries no token).
"""

from __future__ import annotations

import re
from copy import deepcopy
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from django.apps import apps
from django.contrib.auth.models import User
from django.contrib.contenttypes.models import ContentType
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve

from annotate.actions import PairInput, add_pairs, claim_next_pair, create_ai_labeler
from annotate.importing import start_import_job
from annotate.models import Assignment, Campaign, Judgment, Pair
from tests.conftest import make_campaign
from training import actions as training_actions
from training.config import build_config
from training.models import Job

pytestmark = pytest.mark.django_db

# A redirect is written "-> <URL name>"; "?next" when the login page is to come back to this URL.
LOGIN = "-> login?next"
ADMIN_LOGIN = "-> admin:login?next"
OUT = "-> login"  # logged out, then the login page
ROUND = "-> round_detail"
CAMPAIGN = "-> campaign_detail"
LABEL = "-> label"
PERSONAS = ("anonymous", "member", "non_member", "reviewer", "admin")

# One row per named URL pattern: the status each persona gets, GET then POST. Members label the
# campaign; non-members label another campaign; reviewers read every campaign and round; admins
# (superusers) do everything. A new URL needs a row here (the first test says which).
#
#                            anonymous       member          non-member      reviewer        admin
#                            GET    POST     GET    POST     GET    POST     GET    POST     GET    POST
EXPECTED = {
    # The labeling app (annotate/urls.py)
    "home":                  (LOGIN, LOGIN,  200,   405,     200,   405,     200,   405,     200,   405),
    "campaign_detail":       (LOGIN, LOGIN,  404,   405,     404,   405,     200,   405,     200,   405),
    "label":                 (LOGIN, LOGIN,  200,   405,     404,   405,     404,   405,     200,   405),
    "judge":                 (LOGIN, LOGIN,  405,   200,     405,   404,     405,   404,     405,   404),
    "skip":                  (LOGIN, LOGIN,  405,   200,     405,   404,     405,   404,     405,   404),
    "undo":                  (LOGIN, LOGIN,  405,   200,     405,   404,     405,   404,     405,   200),
    "acknowledge_warning":   (LOGIN, LOGIN,  405,   LABEL,   405,   404,     405,   404,     405,   LABEL),
    "instructions":          (LOGIN, LOGIN,  200,   405,     404,   405,     404,   405,     200,   405),
    "quality":               (LOGIN, LOGIN,  404,   404,     404,   404,     200,   404,     200,   400),
    "export":                (LOGIN, LOGIN,  404,   405,     404,   405,     200,   405,     200,   405),
    "import_pairs":          (LOGIN, LOGIN,  404,   404,     404,   404,     404,   404,     200,   400),
    "import_job":            (LOGIN, LOGIN,  404,   405,     404,   405,     404,   405,     200,   405),
    "eval_sets":             (LOGIN, LOGIN,  404,   404,     404,   404,     404,   404,     200,   400),
    "ai_labeler":            (LOGIN, LOGIN,  404,   405,     404,   405,     404,   405,  CAMPAIGN,  405),
    "ai_labeler_start":      (LOGIN, LOGIN,  405,   404,     405,   404,     405,   404,     405, CAMPAIGN),
    "ai_labeler_stop":       (LOGIN, LOGIN,  405,   404,     405,   404,     405,   404,     405, CAMPAIGN),
    # Rounds (training/urls.py)
    "campaign_rounds":       (LOGIN, LOGIN,  404,   404,     404,   404,     200,   404,     200,   200),
    "round_detail":          (LOGIN, LOGIN,  404,   404,     404,   404,     200,   200,     200,   200),
    "job_cancel":            (LOGIN, LOGIN,  405,   404,     405,   404,     405,   404,     405,   ROUND),
    "job_resume":            (LOGIN, LOGIN,  405,   404,     405,   404,     405,   404,     405,   ROUND),
    "round_evaluate":        (LOGIN, LOGIN,  405,   404,     405,   404,     405,   404,     405,   ROUND),
    "round_to_labelers":     (LOGIN, LOGIN,  405,   404,     405,   404,     405,   404,     405,   ROUND),
    # The HTTP API (api/): Bearer tokens only, so every session persona gets 401 (tests/test_api.py tries
    # each role's token on every endpoint); the schema and its docs page are public.
    "api:api-root":          (404,   404) * 5,
    "api:openapi-json":      (200,   405) * 5,
    "api:openapi-view":      (200,   405) * 5,
    "api:not_found":         (404,   404) * 5,
    "api:campaign_list":      (401,   401) * 5,
    "api:campaign_create":    (401,   401) * 5,
    "api:campaign_read":      (401,   405) * 5,
    "api:campaign_update":    (401,   405) * 5,
    "api:import_upload":      (405,   401) * 5,
    "api:import_read":        (401,   405) * 5,
    "api:eval_set_list":      (401,   401) * 5,
    "api:eval_set_upload":    (401,   401) * 5,
    "api:ai_labeler_list":    (401,   401) * 5,
    "api:ai_labeler_create":  (401,   401) * 5,
    "api:ai_labeler_principles": (405, 405) * 5,
    "api:ai_labeler_delete":  (405,   405) * 5,
    "api:ai_labeling_start":  (405,   401) * 5,
    "api:ai_labeling_read":   (401,   405) * 5,
    "api:ai_labeling_stop":   (405,   401) * 5,
    "api:webhook_list":       (401,   401) * 5,
    "api:webhook_add":        (401,   401) * 5,
    "api:webhook_remove":     (405,   405) * 5,
    "api:campaign_queue":     (401,   405) * 5,
    "api:pairs_import":       (405,   401) * 5,
    "api:campaign_export":    (401,   405) * 5,
    "api:label_claim":        (405,   401) * 5,
    "api:label_acknowledge_warning": (405, 401) * 5,
    "api:label_judge":        (405,   401) * 5,
    "api:label_skip":         (405,   401) * 5,
    "api:label_undo":         (405,   401) * 5,
    "api:round_list":         (401,   401) * 5,
    "api:round_launch":       (401,   401) * 5,
    "api:round_launch_report": (401,  405) * 5,
    "api:round_read":         (401,   405) * 5,
    "api:job_cancel":         (405,   401) * 5,
    "api:job_resume":         (405,   401) * 5,
    "api:round_samples":      (401,   405) * 5,
    "api:round_ratings":      (401,   405) * 5,
    "api:round_evaluation":   (401,   405) * 5,
    "api:round_evaluate":     (405,   401) * 5,
    # Accounts (django.contrib.auth.urls)
    "login":                 (200,   200,    200,   200,     200,   200,     200,   200,     200,   200),
    "logout":                (405,   OUT,    405,   OUT,     405,   OUT,     405,   OUT,     405,   OUT),
    "password_change":       (LOGIN, LOGIN,  200,   200,     200,   200,     200,   200,     200,   200),
    "password_change_done":  (LOGIN, LOGIN,  200,   405,     200,   405,     200,   405,     200,   405),
}

# What a POST sends, where an empty form would not show what the view does with a real one.
POST_DATA = {
    "judge": {"choice": "a", "strength": "2", "ms": "1500"},
}

# The admin site (admin/...) goes by a rule instead of a row per model page: everyone but staff is
# sent to the admin's login page, and a superuser gets 200 on GET and POST (an empty POST changes
# nothing: forms answer with their errors, delete pages ask again). The pages that differ:
ADMIN_SUPERUSER = {  # the superuser's (GET, POST) where it is not (200, 200)
    "admin:login": ("-> admin:index", 200),
    "admin:logout": (405, OUT),
    "admin:password_change_done": (200, 405),
    "admin:jsi18n": (200, 405),
    "admin:autocomplete": (403, 405),  # names no model field: refused
    "admin:view_on_site": (CAMPAIGN, CAMPAIGN),
    # django-axes' access log: every field read-only, so an empty POST saves nothing and goes back.
    "admin:axes_accesslog_change": (200, "-> admin:axes_accesslog_changelist"),
    "admin/(?P<url>.*)$": (404, 404),
}
ADMIN_EVERYONE = {  # the whole row, for the pages that the rule does not send to the admin's login
    "admin:login": (200, 200) * 4 + ADMIN_SUPERUSER["admin:login"],
    "admin:logout": ("-> admin:index",) * 8 + ADMIN_SUPERUSER["admin:logout"],
}
ADMIN_OLD_CHANGE_URL = re.compile(r"^admin/(\w+)/(\w+)/<path:object_id>/$")  # Django redirects it to change/


def urlconf_patterns(resolver=None, prefix="", namespace=""):
    """(key, route) for every URL pattern: key is the pattern's name (namespace:name), else its route."""
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            inner = f"{namespace}:{entry.namespace}" if namespace and entry.namespace else entry.namespace
            yield from urlconf_patterns(entry, route, inner or namespace)
        elif isinstance(entry, URLPattern):
            name = f"{namespace}:{entry.name}" if namespace and entry.name else entry.name
            yield name or route, route


def is_admin_site(route: str) -> bool:
    return route.startswith("admin/")


ADMIN_MODEL_PAGE = re.compile(r"^admin/(\w+)/(\w+)/(?:<path:object_id>/)?(add|change|delete|history)/$")


def superuser_on_model_page(route: str) -> tuple | None:
    """A superuser's (GET, POST) on a model's add, change, delete or history page, from what its ModelAdmin
    permits (read-only admins refuse with 403) and whether a row exists (none: sent to the admin index)."""
    page = ADMIN_MODEL_PAGE.match(route)
    if page is None:
        return None
    from django.contrib import admin
    from django.test import RequestFactory

    model = apps.get_model(page.group(1), page.group(2))
    model_admin = admin.site._registry[model]
    request = RequestFactory().get("/")
    request.user = User(username="any-superuser", is_active=True, is_staff=True, is_superuser=True)
    action = page.group(3)
    if action == "add":
        return (200, 200) if model_admin.has_add_permission(request) else (403, 403)
    # Django asks the permission before it looks for the row on delete and on a change POST, after it elsewhere.
    missing = "-> admin:index"  # "no such object": nothing to show
    exists = model._default_manager.exists()
    if action == "delete":
        if not model_admin.has_delete_permission(request):
            return (403, 403)
        return (200, 200) if exists else (missing, missing)
    if action == "change" and not model_admin.has_change_permission(request):
        return (200 if exists else missing, 403)  # viewed, never saved
    return None if exists else (missing, missing)


def expected_row(key: str, route: str) -> tuple | None:
    """The ten statuses a pattern must give (five personas, GET then POST); None: no row for it."""
    if key in EXPECTED:
        return EXPECTED[key]
    if not is_admin_site(route):
        return None
    if key in ADMIN_EVERYONE:
        return ADMIN_EVERYONE[key]
    old_change_url = ADMIN_OLD_CHANGE_URL.match(route)
    if old_change_url:
        superuser = (f"-> admin:{old_change_url.group(1)}_{old_change_url.group(2)}_change",) * 2
    else:
        superuser = ADMIN_SUPERUSER.get(key) or superuser_on_model_page(route) or (200, 200)
    return (ADMIN_LOGIN,) * 8 + superuser


@pytest.fixture
def world(labeler, outsider, reviewer, admin_user, monkeypatch, settings):
    """A campaign the member labels (with an imported judgment), one the non-member labels, the
    member's live assignment, and a round with its jobs."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)  # no broker: the rows suffice
    campaign = make_campaign(n_pairs=5, members=[labeler])
    add_pairs(campaign, [PairInput("Known?", "good", "bad", preferred="a")], notify=False)
    make_campaign(slug="other", n_pairs=2, members=[outsider])
    assignment = claim_next_pair(campaign, labeler).assignment
    round_ = training_actions.launch_round(campaign, admin_user, build_config("tiny", {}))
    upload = SimpleUploadedFile("pairs.jsonl", b'{"prompt": "p", "response_a": "a", "response_b": "b"}\n')
    imported = start_import_job(campaign, admin_user, upload)  # queued on commit: never sent here
    ai_labeler = create_ai_labeler(campaign, name="judge", kind="local", model="unused", principles=["Which?"])
    return {
        "campaign": campaign,
        "users": {"member": labeler, "non_member": outsider, "reviewer": reviewer, "admin": admin_user},
        "values": {
            "slug": campaign.slug,
            "assignment_id": assignment.pk,
            "round_id": round_.pk,
            "job_id": round_.jobs.order_by("order").first().pk,
            "import_id": imported.pk,
            "labeler_id": ai_labeler.pk,
            "run_id": 1,
            "webhook_id": 1,
            "content_type_id": ContentType.objects.get_for_model(Campaign).pk,
            "id": labeler.pk,
            "uidb64": "MQ",
            "token": "no-such-token",
            "app_label": "annotate",
            "url": "no-such-page/",
        },
    }


def concrete_url(route: str, values: dict) -> str:
    """The route with each parameter filled in from the fixtures; an admin object id names a row of
    the admin page's own model."""
    values = dict(values)
    model_page = re.match(r"^admin/(\w+)/(\w+)/<path:object_id>/", route)
    if model_page:
        model = apps.get_model(model_page.group(1), model_page.group(2))
        values["object_id"] = model._default_manager.order_by("pk").values_list("pk", flat=True).first()
    elif "object_id" in route:
        values["object_id"] = Campaign.objects.get(slug=values["slug"]).pk

    def fill(match):
        return quote(str(values[match.group("name")]))

    url = re.sub(r"\(\?P<(?P<name>\w+)>[^)]*\)", fill, route)  # a regex pattern's groups
    url = re.sub(r"<(?:\w+:)?(?P<name>\w+)>", fill, url)  # a route's <converter:name>
    return "/" + url.replace("^", "").replace("$", "")


def persona_cookies(users: dict) -> dict:
    cookies = {"anonymous": Client().cookies}
    for persona, user in users.items():
        client = Client()
        client.force_login(user)
        cookies[persona] = client.cookies
    return cookies


def outcome(response, url: str) -> str | int:
    """The status, or for a redirect "-> <URL name>" of where it goes ("?next" when it comes back here)."""
    if response.status_code != 302:
        return response.status_code
    location = urlsplit(response["Location"])
    name = resolve(location.path).view_name
    comes_back = parse_qs(location.query).get("next") == [url]
    return f"-> {name}{'?next' if comes_back else ''}"


def request(cookies, method: str, url: str, data: dict) -> str | int:
    """One request in a savepoint that is rolled back: every row sees the same starting state."""
    client = Client()
    client.cookies = deepcopy(cookies)
    with transaction.atomic():
        response = client.get(url) if method == "GET" else client.post(url, data)
        transaction.set_rollback(True)
    return outcome(response, url)


def test_it_has_a_row_for_every_url_pattern_and_a_pattern_for_every_row():
    patterns = dict(urlconf_patterns())
    problems = [
        f"no row for URL pattern {key!r} (route {route!r}): add `{key!r}: (...ten statuses...)` to EXPECTED"
        for key, route in patterns.items() if expected_row(key, route) is None
    ]
    problems += [f"the row {key!r} names no URL pattern: remove it from EXPECTED" for key in EXPECTED
                 if key not in patterns]
    problems += [f"the row {key!r} has {len(row)} statuses, not 10 (five personas, GET then POST)"
                 for key, row in {**EXPECTED, **ADMIN_EVERYONE}.items() if len(row) != 2 * len(PERSONAS)]
    assert not problems, "\n".join(problems)


def test_every_persona_gets_the_expected_status_from_every_url(world):
    cookies = persona_cookies(world["users"])
    wrong = []
    for key, route in urlconf_patterns():
        row = expected_row(key, route)
        if row is None:
            continue  # reported by the test above, with the row to add
        url = concrete_url(route, world["values"])
        for i, persona in enumerate(PERSONAS):
            for j, method in enumerate(("GET", "POST")):
                got = request(cookies[persona], method, url, POST_DATA.get(key, {}))
                if got != row[2 * i + j]:
                    wrong.append(f"{key} {method} {url} as {persona}: expected {row[2 * i + j]}, got {got}")
    assert not wrong, "\n".join(["statuses that differ from the table:", *wrong])


def stored_state() -> dict:
    """What a POST could change: judgments, leases, pairs, jobs, campaigns, users."""
    return {
        "judgments": sorted(Judgment.objects.values_list("pk", "choice")),
        "assignments": sorted(Assignment.objects.values_list("pk", "completed_at", "skipped")),
        "pairs": Pair.objects.count(),
        "jobs": sorted(Job.objects.values_list("pk", "status")),
        "campaigns": sorted(Campaign.objects.values_list("pk", "is_active")),
        "users": sorted(User.objects.values_list("pk", "is_active", "password")),
    }


def test_a_post_without_a_csrf_token_is_refused_everywhere(world):
    """Every state change needs the CSRF token: a forged form from another site is refused (403, or the
    refusal the persona gets with a token: the login page or 404) and changes nothing, whoever's browser
    sends it."""
    cookies = persona_cookies(world["users"])
    before = stored_state()
    accepted = []
    for key, route in urlconf_patterns():
        url = concrete_url(route, world["values"])
        row = expected_row(key, route)
        for i, persona in enumerate(PERSONAS):
            client = Client(enforce_csrf_checks=True)
            client.cookies = deepcopy(cookies[persona])
            response = client.post(url, POST_DATA.get(key, {}))
            refused_anyway = row is not None and row[2 * i + 1] in (401, 404, 405, LOGIN, ADMIN_LOGIN)
            if response.status_code != 403 and not (refused_anyway and outcome(response, url) == row[2 * i + 1]):
                accepted.append(f"{key} POST {url} as {persona}: {response.status_code}")
    assert not accepted, "POSTs without a CSRF token that were not refused:\n" + "\n".join(accepted)
    assert stored_state() == before
