"""Which policy a round starts from: the campaign's SFT policy (the one it names, its first round's,
PAIRLOOP_POLICY_MODEL, else the project's demo policy) and, after a first round, the newest policy
trained from it. The demo policy is only named here on the web side; a training worker builds it."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from annotate.models import Campaign
from training.models import Round


def demo_policy_dir(preset: str | None = None) -> Path:
    """Where the demo policy of `preset` (default PAIRLOOP_DEMO_POLICY_PRESET) is cached, under MODELS_DIR."""
    preset = preset or settings.PAIRLOOP["DEMO_POLICY_PRESET"]
    name = "demo-policy" if preset == "demo" else f"demo-policy-{preset}"
    return Path(settings.PAIRLOOP["MODELS_DIR"]) / name


def base_policy(campaign: Campaign, preset: str) -> str:
    """The campaign's SFT policy: the one it names, else its first round's, else PAIRLOOP_POLICY_MODEL, else the
    demo policy's path (built by the first training job that needs it, never by the web process)."""
    if campaign.policy_model:
        return campaign.policy_model
    first = Round.objects.filter(campaign=campaign).order_by("number").first()
    if first is not None and first.config.get("base_policy"):
        return first.config["base_policy"]
    if settings.PAIRLOOP["POLICY_MODEL"]:
        return settings.PAIRLOOP["POLICY_MODEL"]
    return str(demo_policy_dir(preset))


def parent_policy(campaign: Campaign, preset: str) -> str:
    """Round N+1 starts from the newest trained policy that grew from the campaign's SFT policy; the first
    round (and the first after the campaign names another policy) from the SFT policy itself."""
    base = base_policy(campaign, preset)
    latest = (Round.objects.filter(campaign=campaign, config__base_policy=base).exclude(policy_checkpoint="")
              .order_by("-number").first())
    return latest.policy_checkpoint if latest is not None else base


def ensure_policy(path: str, preset: str) -> str:
    """Build the demo policy first when `path` is the demo policy's cached directory (the training
    worker builds it, never the web process); any other policy is used as given."""
    from demo.policy import PRESETS, ensure_demo_policy  # torch: kept out of the web process's imports

    for name in PRESETS:
        if Path(path) == demo_policy_dir(name):
            return str(ensure_demo_policy(path, preset=name))
    return path


def default_policy(preset: str | None = None, on_progress=None) -> str:
    """The policy a campaign's first round starts from, built now if it is the demo policy:
    PAIRLOOP_POLICY_MODEL, else the demo policy of `preset` (default PAIRLOOP_DEMO_POLICY_PRESET)."""
    if settings.PAIRLOOP["POLICY_MODEL"]:
        return settings.PAIRLOOP["POLICY_MODEL"]
    from demo.policy import ensure_demo_policy  # torch: kept out of the web process's imports

    preset = preset or settings.PAIRLOOP["DEMO_POLICY_PRESET"]
    kwargs = {} if on_progress is None else {"on_progress": on_progress}
    return str(ensure_demo_policy(demo_policy_dir(preset), preset=preset, **kwargs))
