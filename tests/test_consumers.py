"""The WebSockets keep checking access: a labeler removed from a campaign, a reviewer demoted, an
account deactivated or a campaign closed gets no more pushes, and the socket is closed (code 4403),
both when the admin's change announces itself and when it does not (the next push rechecks).
On the real Channels layer (Redis), with real commits, as in production."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group

from annotate.access import REVIEWERS_GROUP
from annotate.actions import PairInput, add_pairs
from annotate.consumers import ACCESS_GONE
from annotate.models import Campaign
from tests.conftest import make_campaign, make_user
from training import actions as training_actions
from training import live as training_live
from training.config import build_config

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5


def communicator(path: str, user) -> WebsocketCommunicator:
    from pairloop.routing import websocket_urlpatterns

    socket = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    socket.scope["user"] = user
    return socket


async def connected(path: str, user) -> WebsocketCommunicator:
    socket = communicator(path, user)
    accepted, _ = await socket.connect(timeout=TIMEOUT)
    assert accepted, f"{user.username} was refused {path}"
    return socket


async def assert_closed_for_access(socket: WebsocketCommunicator) -> None:
    message = await socket.receive_output(timeout=TIMEOUT)
    assert message == {"type": "websocket.close", "code": ACCESS_GONE}


def new_pairs(campaign: Campaign, tag: str) -> None:
    """Pairs arriving in the campaign, announced to its labelers (as an import or a round does)."""
    add_pairs(campaign, [PairInput(f"{tag} {i}?", f"yes {i}", f"no {i}") for i in range(2)])


@pytest.fixture
def campaign(labeler):
    return make_campaign(slug="shop", members=[labeler, make_user("mia-member")])


@pytest.fixture
def round_(monkeypatch, settings, admin_user):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)  # no worker: the rows suffice
    campaign = make_campaign(slug="trained")
    add_pairs(campaign, [PairInput("Known?", "good", "bad", preferred="a")], notify=False)
    return training_actions.launch_round(campaign, admin_user, build_config("tiny", {}))


def member_removed_by_the_admin(campaign, user):
    campaign.members.remove(user)  # what the admin's members widget does: an m2m_changed signal


def member_removed_silently(campaign, user):
    Campaign.members.through.objects.filter(campaign=campaign, user=user).delete()  # no signal


@pytest.mark.parametrize("remove", [member_removed_by_the_admin, member_removed_silently])
def test_it_stops_pushing_pairs_to_a_labeler_removed_from_the_campaign(campaign, labeler, remove):
    other = campaign.members.get(username="mia-member")
    path = f"/ws/campaigns/{campaign.slug}/"

    async def session():
        removed = await connected(path, labeler)
        staying = await connected(path, other)
        await sync_to_async(remove)(campaign, labeler)
        if remove is member_removed_by_the_admin:
            await assert_closed_for_access(removed)  # at once, before any push
        await sync_to_async(new_pairs)(campaign, "After removal")
        fragment = await staying.receive_from(timeout=TIMEOUT)
        assert 'id="queue-signal"' in fragment and "2 new pairs arrived" in fragment
        if remove is member_removed_silently:
            await assert_closed_for_access(removed)  # the push rechecked and closed instead of sending
        assert await removed.receive_nothing(timeout=0.5)
        await staying.disconnect()

    async_to_sync(session)()


def test_it_closes_the_sockets_of_a_deactivated_labeler_and_of_a_closed_campaign(campaign, labeler):
    other = campaign.members.get(username="mia-member")
    path = f"/ws/campaigns/{campaign.slug}/"

    def deactivate(user):
        user.is_active = False
        user.save(update_fields=["is_active"])

    def close_campaign():
        campaign.is_active = False
        campaign.save(update_fields=["is_active"])

    async def session():
        first = await connected(path, labeler)
        second = await connected(path, other)
        await sync_to_async(deactivate)(labeler)
        await assert_closed_for_access(first)
        assert await second.receive_nothing(timeout=0.5)  # the other account is untouched
        await sync_to_async(close_campaign)()
        await assert_closed_for_access(second)

    async_to_sync(session)()


def demoted_by_the_admin(user):
    user.groups.remove(Group.objects.get(name=REVIEWERS_GROUP))


def demoted_silently(user):
    Group.objects.get(name=REVIEWERS_GROUP).user_set.through.objects.filter(user=user).delete()  # no signal


@pytest.mark.parametrize("demote", [demoted_by_the_admin, demoted_silently])
def test_it_stops_pushing_a_round_s_jobs_to_a_demoted_reviewer(round_, reviewer, admin_user, demote):
    job = round_.jobs.order_by("order").first()
    n_jobs = round_.jobs.count()
    path = f"/ws/rounds/{round_.pk}/"

    async def session():
        demoted = await connected(path, reviewer)
        watching = await connected(path, admin_user)
        for socket in (demoted, watching):
            for _ in range(2 * n_jobs):  # each job's fragment and points on connect
                await socket.receive_from(timeout=TIMEOUT)
        await sync_to_async(demote)(reviewer)
        if demote is demoted_by_the_admin:
            await assert_closed_for_access(demoted)
        await sync_to_async(training_live.job_changed)(job)
        assert f'id="job-{job.pk}-live"' in await watching.receive_from(timeout=TIMEOUT)
        await watching.receive_from(timeout=TIMEOUT)  # its points
        if demote is demoted_silently:
            await assert_closed_for_access(demoted)
        assert await demoted.receive_nothing(timeout=0.5)
        await watching.disconnect()

    async_to_sync(session)()


def test_an_admin_demoted_to_reviewer_keeps_watching_without_the_admin_buttons(round_, admin_user):
    job = round_.jobs.order_by("order").first()
    n_jobs = round_.jobs.count()

    def demote_to_reviewer():
        admin_user.groups.add(Group.objects.get_or_create(name=REVIEWERS_GROUP)[0])
        admin_user.is_staff = admin_user.is_superuser = False
        admin_user.save(update_fields=["is_staff", "is_superuser"])

    async def session():
        socket = await connected(f"/ws/rounds/{round_.pk}/", admin_user)
        on_connect = [await socket.receive_from(timeout=TIMEOUT) for _ in range(2 * n_jobs)]
        assert f'id="job-{job.pk}-cancel"' in "".join(on_connect)
        await sync_to_async(demote_to_reviewer)()
        await sync_to_async(training_live.job_changed)(job)
        html = await socket.receive_from(timeout=TIMEOUT)
        await socket.receive_from(timeout=TIMEOUT)  # its points
        await socket.disconnect()
        return html

    html = async_to_sync(session)()
    assert f'id="job-{job.pk}-live"' in html and f'id="job-{job.pk}-cancel"' not in html
