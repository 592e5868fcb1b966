"""Tells open WebSockets to recheck access when it may have shrunk: a user removed from a campaign or
from a group (reviewers), a user's account or staff rights changed or deleted, a campaign changed
(closed) or deleted. These changes come from the Django admin and the shell, so they arrive as model
signals. The event goes on commit, so the consumer's recheck reads the new rows; it names nothing,
since each consumer rechecks with its own access function (annotate.consumers)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

from annotate import live
from annotate.models import Campaign


def user_group(user_id) -> str:
    """The Channels group of every WebSocket one user has open."""
    return f"user-{user_id}"


def access_changed(groups) -> None:
    """After the current transaction commits, ask every socket in these groups to recheck access."""
    groups = sorted(set(groups))

    def send():
        for group in groups:
            live.send(group, {"type": "access.changed"})

    if groups:
        transaction.on_commit(send)


def campaign_members_changed(sender, instance, action, reverse, pk_set, **kwargs):
    """Members removed: campaign.members.remove(...) / .clear(), or user.campaigns.remove(...) / .clear()."""
    if action not in ("post_remove", "pre_clear"):
        return
    if reverse:  # instance is the user
        users = [instance.pk]
    elif action == "post_remove":
        users = pk_set
    else:  # before the rows go: whose they are
        users = instance.members.values_list("pk", flat=True)
    access_changed(user_group(pk) for pk in users)


def user_groups_changed(sender, instance, action, reverse, pk_set, **kwargs):
    """Groups left: user.groups.remove(...) / .clear(), or group.user_set.remove(...) / .clear()."""
    if action not in ("post_remove", "pre_clear"):
        return
    if not reverse:  # instance is the user
        users = [instance.pk]
    elif action == "post_remove":
        users = pk_set
    else:
        users = instance.user_set.values_list("pk", flat=True)
    access_changed(user_group(pk) for pk in users)


def user_saved(sender, instance, created, update_fields=None, **kwargs):
    if created or (update_fields is not None and set(update_fields) == {"last_login"}):
        return  # a new account has no socket; logging in changes no rights
    access_changed([user_group(instance.pk)])


def user_deleted(sender, instance, **kwargs):
    access_changed([user_group(instance.pk)])


def campaign_saved(sender, instance, created, **kwargs):
    if not created:
        access_changed([instance.group_name()])


def campaign_deleted(sender, instance, **kwargs):
    access_changed([instance.group_name()])


def connect() -> None:
    """Connect the handlers (AnnotateConfig.ready)."""
    user_model = get_user_model()
    m2m_changed.connect(campaign_members_changed, sender=Campaign.members.through,
                        dispatch_uid="pairloop-campaign-members")
    m2m_changed.connect(user_groups_changed, sender=user_model.groups.through,
                        dispatch_uid="pairloop-user-groups")
    post_save.connect(user_saved, sender=user_model, dispatch_uid="pairloop-user-saved")
    post_delete.connect(user_deleted, sender=user_model, dispatch_uid="pairloop-user-deleted")
    post_save.connect(campaign_saved, sender=Campaign, dispatch_uid="pairloop-campaign-saved")
    post_delete.connect(campaign_deleted, sender=Campaign, dispatch_uid="pairloop-campaign-deleted")
