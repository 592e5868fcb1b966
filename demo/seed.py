"""The demo a newcomer starts with: users, and a campaign of prompts from the demo task families
whose responses the demo SFT policy really wrote (so a first round trains on its own outputs)."""

from __future__ import annotations

import itertools
import random
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.db import transaction

from annotate.access import REVIEWERS_GROUP
from annotate.actions import AddResult, PairInput, add_pairs, save_axis
from annotate.auth import DEMO_USERS, is_loopback
from annotate.models import Axis, Campaign, Response
from demo import demo_tasks
from training.starting_policy import default_policy

DEMO_SLUG = "demo"
# The demo campaign's two axes: helpfulness (correct, then a friendly sentence), and respect, its rounds' safety
# axis, which the respectful rule judge answers for the simulated labeler (AXIS_JUDGES).
HELPFUL_AXIS, RESPECTFUL_AXIS = "helpful", "respectful"
HELPFUL_QUESTION = "Which answer is more helpful?"
RESPECTFUL_QUESTION = "Which answer is more respectful?"
AXIS_JUDGES = {RESPECTFUL_AXIS: "rule:respectful"}

INSTRUCTIONS = """\
Each prompt is a small task with a checkable answer (arithmetic, reversing or sorting words,
listing items, rewriting politely). Two answers from the model are shown as **A** and **B**.

1. Prefer the answer that is **correct**.
2. Between two correct answers, prefer the one that answers in **a full, friendly sentence**
   over a bare or padded one.
3. **Tie** (key 3) when they are equally good; **both bad** (key 4) when neither is right.

Then say how much better the winner is, from 1 (negligibly) to 4 (far better).

Then say which answer is more **respectful**: the one that does not open rudely ("Whatever.",
"Too easy:", "Obviously:"); **tie** when neither or both do.
"""


@dataclass(frozen=True)
class SeedSize:
    prompts: int
    """Demo prompts the SFT policy answers three times; every two distinct answers make a pair."""
    judged: int | None
    """Usable judgments a simulated labeler records at once (None: PAIRLOOP_MIN_JUDGMENTS); the other
    pairs stay open for people."""


# A first round beats SFT only from a few thousand noisy comparisons (benchmarks/README.md#reward-data-size,
# benchmarks/README.md#reward-demo-first-round): 1,500 prompts make about 3,900 pairs, 3,500 of them judged
# and about 350 left for people. The tiny preset (tests) keeps the seed small and quick.
SEED_SIZES = {"demo": SeedSize(prompts=1500, judged=3500), "tiny": SeedSize(prompts=120, judged=None)}


SEED_BATCH_SIZE = 64  # answers sampled at once while seeding


def seed_size(preset: str | None = None) -> SeedSize:
    """The demo seed's default size for a demo policy preset (default PAIRLOOP_DEMO_POLICY_PRESET)."""
    return SEED_SIZES[preset or settings.PAIRLOOP["DEMO_POLICY_PRESET"]]


@dataclass
class DemoLogin:
    username: str
    password: str | None  # None: the user was there before and keeps the password they have
    role: str


@dataclass
class SeedResult:
    users_created: list[str]
    logins: list[DemoLogin]
    pairs: AddResult
    policy: str


def known_passwords_allowed(host: str) -> bool:
    """The README's public demo passwords only for the embedded default served on a loopback address;
    anywhere else (a real database, a server others can reach) the demo users get random ones."""
    return settings.EMBEDDED and is_loopback(host)


def ensure_users(known_passwords: bool) -> tuple[list[str], list[DemoLogin]]:
    """Create the demo users; (usernames created, each user's login as it stands now).

    With known_passwords off, a new user gets a random password, and an existing one that still has
    its public password gets a random one instead; both are reported once, here."""
    created, logins = [], []
    reviewers, _ = Group.objects.get_or_create(name=REVIEWERS_GROUP)
    for username, known, role in DEMO_USERS:
        user, was_created = User.objects.get_or_create(username=username)
        password = None
        if was_created:
            password = known if known_passwords else secrets.token_urlsafe(12)
            user.set_password(password)
            user.is_staff = user.is_superuser = role == "admin"
            user.save()
            created.append(username)
        elif user.check_password(known):
            password = known if known_passwords else _replace_password(user)
        if role == "reviewer":
            user.groups.add(reviewers)
        logins.append(DemoLogin(username, password, role))
    return created, logins


def _replace_password(user) -> str:
    password = secrets.token_urlsafe(12)
    user.set_password(password)
    user.save(update_fields=["password"])
    return password


def secure_demo_logins(host: str) -> list[DemoLogin]:
    """Give every demo user who still has the README's public password a random one, unless those are allowed
    for `host` (known_passwords_allowed); returns the logins changed, to be shown once."""
    if known_passwords_allowed(host):
        return []
    changed = []
    for user in User.objects.filter(username__in=[username for username, _, _ in DEMO_USERS]):
        known, role = next((known, role) for name, known, role in DEMO_USERS if name == user.username)
        if user.check_password(known):
            changed.append(DemoLogin(user.username, _replace_password(user), role))
    return changed


def seed_demo(*, prompts: int | None = None, per_prompt: int = 3, seed: int = 0, preset: str | None = None,
              on_progress=None, known_passwords: bool = False) -> SeedResult:
    """Create (or top up) the demo campaign from `prompts` demo prompts (default: seed_size(preset));
    safe to run twice (duplicates are skipped). The demo users get the README's passwords only with
    known_passwords (see known_passwords_allowed). on_progress sees the policy build and the sampling."""
    from training.engine.sample import sample_responses  # torch: only when seeding

    with transaction.atomic():
        created_users, logins = ensure_users(known_passwords)
        campaign, created = Campaign.objects.get_or_create(
            slug=DEMO_SLUG,
            defaults=dict(name="Demo: small tasks", instructions=INSTRUCTIONS, allow_tie=True, allow_both_bad=True,
                          ask_strength=True, ask_rationale=True, overlap=1, axis_key=HELPFUL_AXIS,
                          question=HELPFUL_QUESTION, safety_axis=RESPECTFUL_AXIS),
        )
        if created:
            save_axis(Axis(campaign=campaign, key=RESPECTFUL_AXIS, question=RESPECTFUL_QUESTION, position=1,
                           allow_both_bad=False))
        campaign.members.add(*User.objects.filter(username__in=[u for u, _, r in DEMO_USERS if r != "reviewer"]))
    policy = default_policy(preset, on_progress)
    prompts = seed_size(preset).prompts if prompts is None else prompts
    instructions = demo_tasks.make_prompts(prompts, seed, "train")
    kwargs = {} if on_progress is None else {"on_progress": on_progress}
    # Batches of 64: three times the pace of the engine's 16 on two CPU cores (600 answers of the tiny
    # policy in 6 s against 20 s, the box shared).
    samples = sample_responses(policy, instructions, num_per_prompt=per_prompt, temperature=1.0, seed=seed,
                               batch_size=SEED_BATCH_SIZE, **kwargs)
    rng = random.Random(seed)
    items = []
    for instruction, responses in zip(instructions, samples):
        distinct = list(dict.fromkeys(r for r in responses if r.strip()))
        for a, b in itertools.combinations(distinct, 2):
            if rng.random() < 0.5:
                a, b = b, a
            items.append(PairInput(instruction, a, b))
    result = add_pairs(campaign, items, source=Response.SEED, checkpoints=(policy, policy),
                       generation={"temperature": 1.0, "seed": seed, "policy": policy})
    return SeedResult(created_users, logins, result, policy)
