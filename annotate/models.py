"""The labeling domain: campaigns, prompts, responses, pairs, assignments (leases) and judgments.

State changes go through annotate/actions.py; read-only rules live here on the models.
"""

from __future__ import annotations

import hashlib
import json

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import connection, models
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone

from annotate.limits import INT32_MAX, INT32_MIN


def content_hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:40]


def storable(text: str) -> str:
    """A model's text as the database stores it: a NUL character, which PostgreSQL's text and JSON refuse, shown as
    U+FFFD (a random or broken model writes one now and then)."""
    return text.replace("\x00", "\ufffd")


# A campaign's bounds, (lowest, highest) per setting: the model's validators, so the admin and
# change_campaign_settings refuse what is outside, and the API schema's ranges.
CAMPAIGN_BOUNDS: dict[str, tuple[float, float]] = {
    "overlap": (1, 100),
    "tie_break_limit": (0, 100),
    "lease_seconds": (10, 7 * 24 * 3600),
    "daily_cap": (1, INT32_MAX),
    "gold_rate": (0.0, 1.0),
    "min_new_share": (0.0, 1.0),
    "max_new_tokens": (1, 32_768),
    "temperature": (0.01, 100.0),
    "top_p": (0.01, 1.0),
}


def within_bounds(name: str) -> list:
    """The validators of a campaign setting's range, from CAMPAIGN_BOUNDS."""
    low, high = CAMPAIGN_BOUNDS[name]
    return [MinValueValidator(low), MaxValueValidator(high)]


DEFAULT_AXIS_KEY = "overall"
DEFAULT_QUESTION = "Which response is better?"


AXIS_FIELDS = ("id", "key", "question", "position", "allow_tie", "allow_both_bad", "ask_strength")  # as read per judgment


def _json_rows(value) -> list:
    """A JSON array column as a list: PostgreSQL's driver parses it, SQLite gives text; NULL (no rows) is []."""
    if value is None:
        return []
    return json.loads(value) if isinstance(value, str) else value


class Campaign(models.Model):
    slug = models.SlugField(unique=True, allow_unicode=True)
    name = models.CharField(max_length=200)
    instructions = models.TextField(blank=True, help_text="Markdown, shown to labelers one click away.")
    allow_tie = models.BooleanField(default=True, help_text="Offer 'tie' (key 3).")
    allow_both_bad = models.BooleanField(default=True, help_text="Offer 'both bad' (key 4).")
    ask_strength = models.BooleanField(default=True, help_text="Ask how much better, 1 (slightly) to 4 (far).")
    ask_rationale = models.BooleanField(default=False, help_text="Offer an optional rationale field.")
    # The campaign's first axis: its key and question; the options above are its choices. Further axes are
    # Axis rows, asked after it on the same pair; a judgment's own choice is always on this one.
    axis_key = models.SlugField(max_length=40, default=DEFAULT_AXIS_KEY,
                                help_text="Name of the first axis in exports (--axis); default 'overall'.")
    question = models.CharField(max_length=300, default=DEFAULT_QUESTION,
                                help_text="The first axis's question, shown above the choices.")
    overlap = models.PositiveSmallIntegerField(default=1, validators=within_bounds("overlap"),
                                               help_text="Judgments wanted per pair (k).")
    tie_break_limit = models.PositiveSmallIntegerField(
        default=0, validators=within_bounds("tie_break_limit"),
        help_text="Extra judgments a pair whose judgments split may get, one at a time; 0 = none.")
    lease_seconds = models.PositiveIntegerField(default=600, validators=within_bounds("lease_seconds"),
                                                help_text="A claimed pair returns to the queue after this.")
    daily_cap = models.PositiveIntegerField(null=True, blank=True, validators=within_bounds("daily_cap"),
                                            help_text="Judgments per labeler per day; empty = no cap.")
    gold_rate = models.FloatField(default=0.0, validators=within_bounds("gold_rate"),
                                  help_text="Share of gold items mixed in (0-1).")
    content_warning = models.TextField(
        blank=True, help_text="Markdown shown before a labeler's first pair (e.g. red-team data), acknowledged "
                              "once per labeler; empty = none.")
    min_new_share = models.FloatField(
        default=0.1, validators=within_bounds("min_new_share"),
        help_text="New judgments a launch needs unconfirmed, as a share of the pairs the last successful round "
                  "sent back (0-1); 0: one new judgment is enough.")
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="campaigns")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    # The models its rounds train, and how the policy is prompted and sampled (training/config.py reads them).
    policy_model = models.CharField(
        max_length=500, blank=True, help_text="Policy the rounds start from: a Hugging Face name or a local "
                                              "path; empty: PAIRLOOP_POLICY_MODEL, else the demo policy.")
    reference_model = models.CharField(
        max_length=500, blank=True, help_text="Reference of PPO's KL penalty; empty: the starting policy.")
    reward_model = models.CharField(
        max_length=500, blank=True, help_text="Reward backbone: a name or path, or 'sft' (the starting policy "
                                              "with a score head); empty: the round preset's ('sft').")
    system_prompt = models.TextField(
        blank=True, help_text="System turn the policy sees before every prompt (in its chat template); empty: none.")
    max_new_tokens = models.PositiveIntegerField(
        null=True, blank=True, validators=within_bounds("max_new_tokens"),
        help_text="Longest response in PPO and sampling; empty: the round preset's.")
    temperature = models.FloatField(
        null=True, blank=True, validators=within_bounds("temperature"),
        help_text="Sampling temperature of new pairs' responses; empty: the round preset's.")
    top_p = models.FloatField(
        null=True, blank=True, validators=within_bounds("top_p"),
        help_text="Nucleus sampling of new pairs' responses; empty: 1 (the whole distribution).")
    stop_strings = models.TextField(
        blank=True, help_text="Texts that end a response besides the model's end-of-turn tokens, one per line.")
    safety_axis = models.SlugField(
        max_length=40, blank=True,
        help_text="Key of the axis whose reward model is the rounds' safety reward; empty: the round setting's (none).")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def get_absolute_url(self):
        return reverse("campaign_detail", args=[self.slug])

    def label_url(self):
        return reverse("label", args=[self.slug])

    def choices_offered(self) -> list[str]:
        return _offered(self.allow_tie, self.allow_both_bad)

    def first_axis(self) -> Axis:
        """The axis a judgment's own choice is on, from the campaign's fields (never saved as a row)."""
        return Axis(campaign=self, key=self.axis_key, question=self.question, position=-1,
                    allow_tie=self.allow_tie, allow_both_bad=self.allow_both_bad, ask_strength=self.ask_strength)

    def axes(self) -> list[Axis]:
        """Every axis asked on a pair, in order: the first axis, then the campaign's Axis rows (read once per
        campaign object: with the campaign itself where annotate.access read it, else one query)."""
        if not hasattr(self, "_axes"):
            if hasattr(self, "further_axes_json"):  # annotate.access read them with the campaign
                further = self._axes_from_rows(_json_rows(self.further_axes_json))
            else:
                further = self._further_axes()
            self._axes = [self.first_axis(), *further]
        return self._axes

    @staticmethod
    def further_axes_json_sql(campaign_id_sql: str) -> str:
        """SQL of one JSON array of the further axes' AXIS_FIELDS rows in order, for the campaign whose id is
        `campaign_id_sql`: a column of the campaign's own query (PostgreSQL's json_agg, SQLite's json_group_array)."""
        table = Axis._meta.db_table
        if connection.vendor == "postgresql":
            return (f"(SELECT json_agg(json_build_array({', '.join('x.' + f for f in AXIS_FIELDS)}) "
                    f"ORDER BY x.position, x.id) FROM {table} x WHERE x.campaign_id = {campaign_id_sql})")
        return (f"(SELECT json_group_array(json_array({', '.join('x.' + f for f in AXIS_FIELDS)})) FROM "
                f"(SELECT * FROM {table} WHERE campaign_id = {campaign_id_sql} ORDER BY position, id) x)")

    def _further_axes(self) -> list[Axis]:
        """The Axis rows in order, read with plain SQL."""
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {', '.join(AXIS_FIELDS)} FROM {Axis._meta.db_table} WHERE campaign_id = %s "
                           "ORDER BY position, id", [self.pk])
            return self._axes_from_rows(cursor.fetchall())

    def _axes_from_rows(self, rows) -> list[Axis]:
        """Axis objects of this campaign from AXIS_FIELDS rows, as read from the database (not to be added again)."""
        axes = [Axis(campaign=self, **dict(zip(AXIS_FIELDS, row))) for row in rows]
        for axis in axes:
            axis._state.adding, axis._state.db = False, connection.alias
        return axes

    def has_further_axes(self) -> bool:
        return len(self.axes()) > 1

    def axis(self, key: str | None) -> Axis:
        """The axis named `key` (None: the first); raises Axis.DoesNotExist naming the keys there are."""
        if key is None or key == self.axis_key:
            return self.first_axis()
        found = self.further_axes.filter(key=key).first()
        if found is None:
            keys = ", ".join(axis.key for axis in self.axes())
            raise Axis.DoesNotExist(f"campaign {self.slug} has no axis {key!r}: its axes are {keys}")
        return found

    def group_name(self) -> str:
        return f"campaign-{self.pk}"

    def warning_pending_for(self, user) -> bool:
        """Whether this campaign carries a content warning the user has not acknowledged yet."""
        return bool(self.content_warning) and not self.warning_acknowledgments.filter(user_id=user.pk).exists()


def _offered(allow_tie: bool, allow_both_bad: bool) -> list[str]:
    offered = [Judgment.A, Judgment.B]
    if allow_tie:
        offered.append(Judgment.TIE)
    if allow_both_bad:
        offered.append(Judgment.BOTH_BAD)
    return offered


class Axis(models.Model):
    """A further question asked on every pair of a campaign, after its first axis (Campaign.question)."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="further_axes")
    key = models.SlugField(max_length=40, help_text="Its name in exports (--axis) and in the API's choices.")
    question = models.CharField(max_length=300, help_text="Shown above its choices, e.g. 'Which answer is "
                                                          "less harmful?'.")
    position = models.PositiveSmallIntegerField(default=0, help_text="Asked in this order, after the first axis.")
    allow_tie = models.BooleanField(default=True, help_text="Offer 'tie' (key 3).")
    allow_both_bad = models.BooleanField(default=True, help_text="Offer 'both bad' (key 4).")
    ask_strength = models.BooleanField(default=False, help_text="Ask how much better, 1 (slightly) to 4 (far).")

    class Meta:
        ordering = ["position", "id"]
        constraints = [models.UniqueConstraint(fields=["campaign", "key"], name="axis_key_unique_per_campaign")]

    def __str__(self):
        return self.key

    def is_first(self) -> bool:
        return self.pk is None

    def choices_offered(self) -> list[str]:
        return _offered(self.allow_tie, self.allow_both_bad)

    def clean(self):
        if self.campaign_id is not None and self.key == self.campaign.axis_key:
            raise ValidationError({"key": f"'{self.key}' is the campaign's first axis already"})


class Prompt(models.Model):
    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="prompts")
    text = models.TextField(help_text="The prompt as text (chat turns flattened).")
    turns = models.JSONField(null=True, blank=True, help_text="Chat turns [{role, content}] when given as chat.")
    hash = models.CharField(max_length=40)
    meta = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["campaign", "hash"], name="prompt_unique_per_campaign")]

    def __str__(self):
        return self.text[:80]

    @classmethod
    def training(cls, campaign) -> models.QuerySet:
        """The campaign's training prompts: every prompt but those of a round's blind evaluation pairs (an
        evaluation prompt never carries a training pair, so one evaluation pair marks it)."""
        return cls.objects.filter(campaign=campaign).exclude(pairs__purpose=Pair.EVALUATION)

    def shows_as_conversation(self) -> bool:
        """Whether labelers see the prompt as turns with their roles: any chat prompt but one user turn."""
        return bool(self.turns) and not (len(self.turns) == 1 and self.turns[0]["role"] == "user")


class Response(models.Model):
    IMPORT, POLICY, SEED, REVISION = "import", "policy", "seed", "revision"
    SOURCES = [(IMPORT, "imported"), (POLICY, "policy checkpoint"), (SEED, "demo seed"),
               (REVISION, "an AI labeler's revision of a policy's answer")]

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="responses")
    text = models.TextField()
    hash = models.CharField(max_length=40)
    source = models.CharField(max_length=10, choices=SOURCES, default=IMPORT)
    round = models.ForeignKey("training.Round", null=True, blank=True, on_delete=models.SET_NULL, related_name="responses")
    checkpoint = models.CharField(max_length=500, blank=True, help_text="Policy checkpoint that wrote it.")
    generation = models.JSONField(default=dict, blank=True, help_text="Generation settings.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["prompt", "hash"], name="response_unique_per_prompt")]

    def __str__(self):
        return self.text[:80]


class Pair(models.Model):
    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="pairs")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="pairs")
    response_a = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    response_b = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=40, help_text="Order-free hash of the two responses: duplicates are skipped.")
    PRIORITY_RANGE = (INT32_MIN, INT32_MAX)  # a priority outside the database's integer cannot be stored
    priority = models.IntegerField(default=0, help_text="Higher is served first.")
    round = models.ForeignKey("training.Round", null=True, blank=True, on_delete=models.SET_NULL, related_name="pairs")
    gold_choice = models.CharField(
        max_length=8, blank=True, choices=[("a", "A is better"), ("b", "B is better"), ("tie", "tie"),
                                           ("both_bad", "both bad")],
        help_text="Known answer (in response_a/response_b terms) when this is a gold item: shown to every "
                  "labeler at the campaign's gold rate, to measure agreement.")
    gold_choices = models.JSONField(
        default=dict, blank=True,
        help_text="A gold item's known answers on the campaign's further axes, {axis key: choice} in "
                  "response_a/response_b terms; empty: none (the first axis's is gold_choice).")
    judgments_count = models.PositiveIntegerField(default=0)
    extra_judgments = models.PositiveSmallIntegerField(
        default=0, help_text="Tie-breaks: judgments wanted beyond the overlap because the judgments split.")
    is_open = models.BooleanField(default=True, help_text="Still needs judgments (kept by the actions).")
    TRAINING, EVALUATION = "training", "evaluation"
    PURPOSES = [(TRAINING, "training"), (EVALUATION, "evaluation (blind, never trains)")]
    purpose = models.CharField(
        max_length=10, choices=PURPOSES, default=TRAINING,
        help_text="What its judgments are for: training data, or a round's blind human evaluation (never exported "
                  "for training).")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["campaign", "key"], name="pair_unique_per_campaign")]
        indexes = [
            # The queue's index: open pairs of a campaign by priority. Partial, so judged pairs cost nothing.
            models.Index(
                fields=["campaign", "-priority", "id"], name="pair_queue_idx", condition=Q(is_open=True)
            ),
        ]

    def __str__(self):
        return f"pair {self.pk} ({self.prompt})"

    @staticmethod
    def key_for(response_a_id: int, response_b_id: int) -> str:
        low, high = sorted((response_a_id, response_b_id))
        return content_hash(str(low), str(high))

    def clean(self):
        """Gold answers on further axes name axes of the campaign and known choices, on a gold item."""
        if not self.gold_choices:
            return
        if not isinstance(self.gold_choices, dict) or not self.gold_choice:
            raise ValidationError({"gold_choices": "a gold item's answers {axis key: choice}, beside its "
                                                   "gold_choice on the first axis"})
        keys = [axis.key for axis in self.campaign.axes()[1:]]
        for key, choice in self.gold_choices.items():
            if key not in keys:
                raise ValidationError({"gold_choices": f"no further axis {key!r}: they are {', '.join(keys)}"})
            if choice not in dict(Judgment.CHOICES):
                raise ValidationError({"gold_choices": f"{key}: {choice!r} is not a, b, tie or both_bad"})

    def needs_judgments(self) -> bool:
        return self.judgments_count < self.campaign.overlap + self.extra_judgments

    def gold_on(self, axis: Axis) -> str:
        """The known answer on `axis` (response_a/response_b terms) when this is a gold item there, else ""."""
        return self.gold_choice if axis.is_first() else (self.gold_choices or {}).get(axis.key, "")


# A live lease: a claimed pair neither judged nor skipped whose time has not run out. The ORM spells it
# Assignment.objects.live(now); raw SQL on the hot path writes LIVE_LEASE_SQL, with the assignment table
# aliased `a` and the time as its one parameter.
UNFINISHED = Q(completed_at__isnull=True, skipped=False)
LIVE_LEASE_SQL = "a.completed_at IS NULL AND NOT a.skipped AND a.expires_at > %s"


class AssignmentQuerySet(models.QuerySet):
    def live(self, now=None):
        """The leases still held at `now` (default: the present)."""
        return self.filter(UNFINISHED, expires_at__gt=now or timezone.now())


class Assignment(models.Model):
    """A pair leased to one labeler, with the side each response was shown on."""

    pair = models.ForeignKey(Pair, on_delete=models.CASCADE, related_name="assignments")
    # PROTECT: an assignment holds the side a judgment was shown on; a labeler is deactivated, never deleted.
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="assignments")
    a_on_left = models.BooleanField(help_text="True: response A was shown on the left as 'A'.")
    created_at = models.DateTimeField(default=timezone.now)
    shown_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True, blank=True)
    skipped = models.BooleanField(default=False)

    objects = AssignmentQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["pair", "labeler"], name="one_assignment_per_labeler_pair")]
        indexes = [
            models.Index(fields=["labeler", "completed_at"], name="assignment_labeler_idx"),
            models.Index(fields=["pair", "expires_at"], name="assignment_lease_idx",
                         condition=UNFINISHED),
        ]

    def shown(self) -> tuple[Response, Response]:
        """(left, right) as the labeler saw them."""
        if self.a_on_left:
            return self.pair.response_a, self.pair.response_b
        return self.pair.response_b, self.pair.response_a


class Judgment(models.Model):
    A, B, TIE, BOTH_BAD = "a", "b", "tie", "both_bad"
    CHOICES = [(A, "A is better"), (B, "B is better"), (TIE, "tie"), (BOTH_BAD, "both bad")]
    HUMAN, SIMULATED, IMPORTED, API, AI = "human", "simulated", "import", "api", "ai"
    SOURCES = [(HUMAN, "human"), (SIMULATED, "simulated labeler"), (IMPORTED, "imported preference"),
               (API, "through the HTTP API"), (AI, "AI labeler")]
    UNDOABLE = (HUMAN, API)  # a labeler's own judgments, which they may take back for a few minutes

    # Judgments never disappear by a cascade: deleting a campaign, prompt, response, pair, assignment or
    # user they hang on raises ProtectedError (the admin shows "cannot delete"); users are deactivated.
    pair = models.ForeignKey(Pair, on_delete=models.PROTECT, related_name="judgments")
    assignment = models.OneToOneField(Assignment, null=True, blank=True, on_delete=models.PROTECT,
                                      related_name="judgment")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                                related_name="judgments", help_text="Empty for imported preferences.")
    choice = models.CharField(max_length=8, choices=CHOICES, help_text="In terms of the pair's response_a / response_b.")
    strength = models.PositiveSmallIntegerField(null=True, blank=True, help_text="1 (slightly) .. 4 (far) better.")
    rationale = models.TextField(blank=True)
    milliseconds = models.PositiveIntegerField(null=True, blank=True, help_text="Time from showing to submitting.")
    a_on_left = models.BooleanField(null=True, help_text="Shown order, copied from the assignment.")
    source = models.CharField(max_length=10, choices=SOURCES, default=HUMAN)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["pair", "labeler"], name="one_judgment_per_labeler_pair"),
            models.CheckConstraint(condition=Q(strength__isnull=True) | Q(strength__gte=1, strength__lte=4),
                                   name="strength_1_to_4"),
        ]
        indexes = [models.Index(fields=["labeler", "created_at"], name="judgment_labeler_day_idx")]

    def __str__(self):
        return f"{self.get_choice_display()} on pair {self.pair_id}"

    # Llama 2's margins for a 4-point preference scale (Touvron et al. 2023, sec. 3.2.2):
    # negligibly / slightly / better / significantly better -> 0, 1/3, 2/3, 1.
    STRENGTH_MARGIN = {1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0}

    @classmethod
    def margin_of(cls, strength: int | None) -> float:
        return cls.STRENGTH_MARGIN.get(strength, 0.0)

    def margin(self) -> float:
        return self.margin_of(self.strength)

    def choices_by_axis(self, campaign: Campaign) -> dict[str, str]:
        """Its choice on every axis, {axis key: choice}: its own on the first, then its AxisChoice rows'."""
        further = dict(self.axis_choices.values_list("axis__key", "choice"))
        return {campaign.axis_key: self.choice, **further}

    def chosen_rejected(self, choice: str | None = None) -> tuple[Response, Response] | None:
        """The Bradley-Terry pair (chosen, rejected) of its choice, or of `choice` on another axis; None for
        tie / both bad."""
        choice = choice or self.choice
        if choice == self.A:
            return self.pair.response_a, self.pair.response_b
        if choice == self.B:
            return self.pair.response_b, self.pair.response_a
        return None


class AxisChoice(models.Model):
    """A judgment's choice on one of its campaign's further axes (the first axis's is on the Judgment)."""

    judgment = models.ForeignKey(Judgment, on_delete=models.PROTECT, related_name="axis_choices")
    axis = models.ForeignKey(Axis, on_delete=models.PROTECT, related_name="choices")
    choice = models.CharField(max_length=8, choices=Judgment.CHOICES,
                              help_text="In terms of the pair's response_a / response_b.")
    strength = models.PositiveSmallIntegerField(null=True, blank=True, help_text="1 (slightly) .. 4 (far) better.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["judgment", "axis"], name="one_choice_per_judgment_axis"),
            models.CheckConstraint(condition=Q(strength__isnull=True) | Q(strength__gte=1, strength__lte=4),
                                   name="axis_strength_1_to_4"),
        ]


def on_axis(judgments, axis: Axis):
    """The judgments (a Judgment queryset) that answered `axis`, annotated with their `axis_choice` and
    `axis_strength` on it: the judgment's own on the first axis, its AxisChoice row's on another."""
    if axis.is_first():
        return judgments.annotate(axis_choice=models.F("choice"), axis_strength=models.F("strength"))
    answer = models.FilteredRelation("axis_choices", condition=Q(axis_choices__axis=axis))
    return (judgments.annotate(answer=answer).filter(answer__isnull=False)
            .annotate(axis_choice=models.F("answer__choice"), axis_strength=models.F("answer__strength")))


class ImportJob(models.Model):
    """A file uploaded on a campaign's import page, imported by a Celery task on the default queue."""

    QUEUED, CHECKING, IMPORTING, SUCCEEDED, FAILED = "queued", "checking", "importing", "succeeded", "failed"
    STATUSES = [(QUEUED, "queued"), (CHECKING, "checking the file"), (IMPORTING, "importing"),
                (SUCCEEDED, "imported"), (FAILED, "failed")]
    FINISHED = (SUCCEEDED, FAILED)

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="import_jobs")
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                    on_delete=models.SET_NULL, related_name="+")
    file_name = models.CharField(max_length=255, help_text="The file's name as the browser sent it.")
    file_path = models.CharField(max_length=500,
                                 help_text="The upload, kept in the data directory until imported.")
    file_size = models.BigIntegerField(default=0)
    options = models.JSONField(default=dict, blank=True,
                               help_text="import_file's pairs_per_prompt, seed and priority, from the form.")
    status = models.CharField(max_length=10, choices=STATUSES, default=QUEUED)
    rows_done = models.PositiveIntegerField(default=0, help_text="Rows checked, then rows imported.")
    rows_total = models.PositiveIntegerField(null=True, blank=True,
                                             help_text="Rows in the file, once checked.")
    pairs_created = models.PositiveIntegerField(default=0)
    pairs_skipped = models.PositiveIntegerField(default=0, help_text="Duplicates of pairs already there.")
    errors = models.JSONField(default=list, blank=True,
                              help_text="Why it failed, one line each, naming the line and field.")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Refreshed by the worker while it runs; a stale one fails the job.")
    resent_at = models.DateTimeField(
        null=True, blank=True, help_text="When a job left queued was sent to the workers a second time.")
    finished_at = models.DateTimeField(null=True, blank=True)

    RUNNING = (CHECKING, IMPORTING)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"import of {self.file_name} into {self.campaign}"

    def get_absolute_url(self):
        return reverse("import_job", args=[self.campaign.slug, self.pk])

    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    def progress_fraction(self) -> float | None:
        """Share of rows imported; None while the file is still being checked (its length unknown)."""
        if self.status == self.SUCCEEDED:
            return 1.0
        if self.status != self.IMPORTING or not self.rows_total:
            return None
        return min(1.0, self.rows_done / self.rows_total)


class Exclusion(models.Model):
    """Judgments an admin left out of export and training: a labeler's (all, or from a time on) or one.

    Nothing is deleted: lifting the exclusion (annotate.actions.include_again) brings them back, and the
    export is then byte for byte what it was before. Made and lifted only through annotate/actions.py.
    """

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="exclusions")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                                related_name="exclusions",
                                help_text="Whose judgments; empty for one judgment.")
    since = models.DateTimeField(null=True, blank=True,
                                 help_text="The labeler's judgments from this time on; empty = all of them.")
    judgment = models.ForeignKey(Judgment, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="exclusions", help_text="One judgment; empty for a labeler's.")
    reason = models.TextField(
        help_text="Why, as the admin gave it: shown with every export that leaves them out.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    lifted_at = models.DateTimeField(null=True, blank=True, help_text="Included again at this time.")
    lifted_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="+")

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(labeler__isnull=False, judgment__isnull=True)
                           | Q(labeler__isnull=True, judgment__isnull=False, since__isnull=True)),
                name="exclusion_of_a_labeler_or_one_judgment",
            ),
        ]

    def __str__(self):
        return self.describe()

    def is_active(self) -> bool:
        return self.lifted_at is None

    def describe(self) -> str:
        """What it leaves out and why, in one line."""
        if self.judgment_id is not None:
            what = f"judgment {self.judgment_id}"
        else:
            name = self.labeler.get_username() if self.labeler_id else "?"
            what = f"{name}'s judgments" + (f" from {self.since:%Y-%m-%d %H:%M}" if self.since else "")
        return f"{what}: {self.reason}"

    @staticmethod
    def excluded_judgments(campaign) -> Q:
        """A filter on Judgment matching the campaign's judgments that active exclusions leave out."""
        active = Exclusion.objects.filter(campaign=campaign, lifted_at__isnull=True)
        by_labeler = active.filter(labeler_id=models.OuterRef("labeler_id")).filter(
            Q(since__isnull=True) | Q(since__lte=models.OuterRef("created_at")))
        one = active.filter(judgment_id=models.OuterRef("pk"))
        return Q(models.Exists(by_labeler)) | Q(models.Exists(one))


class WarningAcknowledgment(models.Model):
    """A labeler acknowledged a campaign's content warning (annotate.actions.acknowledge_content_warning)."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="warning_acknowledgments")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    acknowledged_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["campaign", "user"], name="one_acknowledgment_per_user"),
        ]


class EvalSet(models.Model):
    """Prompts a campaign's rounds are evaluated on, never trained on; one version per content (import again
    to change it: a new version, the old one stays for the evaluations made on it)."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="eval_sets")
    name = models.CharField(max_length=200, help_text="What the admin called it (the file's name by default).")
    version = models.CharField(max_length=16, help_text="Hash of its prompts and references, in order.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["campaign", "-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["campaign", "version"], name="eval_set_version_per_campaign")]

    def __str__(self):
        return f"{self.name} ({self.version})"

    @classmethod
    def current(cls, campaign) -> EvalSet | None:
        """The evaluation set a round of this campaign is evaluated on: the one imported last (None if none)."""
        return cls.objects.filter(campaign=campaign).order_by("-created_at", "-id").first()


class EvalPrompt(models.Model):
    """One prompt of an evaluation set (text or chat turns), with the answer it should get when given."""

    eval_set = models.ForeignKey(EvalSet, on_delete=models.CASCADE, related_name="prompts")
    position = models.PositiveIntegerField(help_text="Its line in the imported file.")
    text = models.TextField(help_text="The prompt as text (chat turns flattened), as Prompt.text.")
    turns = models.JSONField(null=True, blank=True, help_text="Chat turns [{role, content}] when given as chat.")
    reference = models.TextField(blank=True, help_text="A reference answer, when the file gave one.")
    hash = models.CharField(max_length=40, help_text="content_hash of the text, as Prompt.hash.")

    class Meta:
        ordering = ["eval_set", "position"]
        constraints = [models.UniqueConstraint(fields=["eval_set", "hash"], name="eval_prompt_unique_per_set")]
        indexes = [models.Index(fields=["hash"], name="eval_prompt_hash_idx")]

    def __str__(self):
        return self.text[:80]


class AILabeler(models.Model):
    """A model that judges a campaign's pairs from written principles (Constitutional AI, Bai et al. 2022),
    through the same queue as people, under an account of its own. Made through annotate/actions.py."""

    ENDPOINT, LOCAL = "endpoint", "local"
    KINDS = [(ENDPOINT, "OpenAI-compatible chat endpoint"), (LOCAL, "local Hugging Face causal LM, run on a worker")]
    SAMPLE, ALL = "sample", "all"
    PRINCIPLE_MODES = [(SAMPLE, "one principle sampled per judgment"), (ALL, "every principle asked, votes combined")]
    TIE, SKIP = "tie", "skip"
    ON_DISAGREEMENT = [(TIE, "a tie (a skip where the campaign offers none)"), (SKIP, "a skip")]

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="ai_labelers")
    name = models.SlugField(max_length=60, help_text="Names its account: ai-<campaign>-<name>.")
    kind = models.CharField(max_length=10, choices=KINDS, default=ENDPOINT)
    base_url = models.URLField(max_length=500, blank=True,
                               help_text="The endpoint's base URL, e.g. http://127.0.0.1:8000/v1; endpoint only.")
    model = models.CharField(max_length=500, help_text="The model's name at the endpoint, or a local path.")
    api_key_env = models.CharField(
        max_length=100, blank=True, help_text="Environment variable holding the endpoint's key; empty: none.")
    principle_mode = models.CharField(max_length=10, choices=PRINCIPLE_MODES, default=SAMPLE)
    on_disagreement = models.CharField(
        max_length=10, choices=ON_DISAGREEMENT, default=SKIP,
        help_text="What a judgment whose two orders disagree becomes.")
    requests_per_minute = models.PositiveIntegerField(
        default=600, validators=[MinValueValidator(1)], help_text="Most calls to the model a minute.")
    timeout_seconds = models.FloatField(default=60.0, validators=[MinValueValidator(0.001)],
                                        help_text="One call's time limit.")
    max_retries = models.PositiveSmallIntegerField(
        default=2, validators=[MaxValueValidator(10)], help_text="Retries of a call the endpoint failed.")
    # PROTECT: the account its judgments hang on.
    account = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="ai_labeler")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["campaign", "name"], name="ai_labeler_unique_per_campaign")]

    def __str__(self):
        return f"{self.name} ({self.model})"

    def clean(self):
        if self.kind == self.ENDPOINT and not self.base_url:
            raise ValidationError({"base_url": "an endpoint labeler needs the endpoint's base URL"})

    @staticmethod
    def account_name(campaign: Campaign, name: str) -> str:
        return f"ai-{campaign.slug}-{name}"[:150]

    @staticmethod
    def axes_problem(campaign: Campaign, principle_axes) -> str:
        """Why principles answering `principle_axes` (axis keys; empty: the campaign's first axis) cannot judge
        its pairs, naming the axis: one it lacks, or one of its axes no principle answers (a judgment answers
        every axis); "" when they can."""
        keys = [axis.key for axis in campaign.axes()]
        answered = {key or campaign.axis_key for key in principle_axes}
        unknown = sorted(answered - set(keys))
        if unknown:
            return f"campaign {campaign.slug} has no axis {', '.join(unknown)}: its axes are {', '.join(keys)}"
        missing = [key for key in keys if key not in answered]
        if missing:
            return (f"no principle answers the axis {', '.join(missing)} of campaign {campaign.slug}: give "
                    "each axis a principle (a principle with no axis answers the first)")
        return ""

    def queue(self) -> str:
        """The Celery queue its runs go to: a local model loads on a training worker (the GPU box), an endpoint
        is only called, from any worker."""
        return "training" if self.kind == self.LOCAL else settings.CELERY_TASK_DEFAULT_QUEUE  # Job.QUEUES' names

    def last_run(self):
        return self.runs.first()


class Principle(models.Model):
    """One question of an AI labeler's constitution, in the CAI paper's multiple-choice style."""

    labeler = models.ForeignKey(AILabeler, on_delete=models.CASCADE, related_name="principles")
    text = models.TextField(help_text="A comparison question, e.g. 'Which of these assistant responses is less "
                                      "harmful? Choose the response that a wise, ethical person would more "
                                      "likely say.'")
    axis = models.CharField(max_length=60, blank=True, help_text="The axis it judges; empty: the campaign's one.")

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return self.text[:80]


class AIVerdict(models.Model):
    """One principle asked of an AI labeler about one pair in both orders: what was sent, what came back."""

    AGREED, DISAGREED, MALFORMED = "agreed", "disagreed", "malformed"
    OUTCOMES = [(AGREED, "both orders agree"), (DISAGREED, "the orders disagree"),
                (MALFORMED, "an answer named neither response")]

    labeler = models.ForeignKey(AILabeler, on_delete=models.PROTECT, related_name="verdicts")
    pair = models.ForeignKey(Pair, on_delete=models.PROTECT, related_name="ai_verdicts")
    judgment = models.ForeignKey(Judgment, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="ai_verdicts", help_text="The judgment it went into; empty: skipped.")
    model = models.CharField(max_length=500, help_text="The model asked, as the labeler named it then.")
    principle = models.TextField()
    axis = models.CharField(max_length=60, blank=True)
    prompt_first = models.JSONField(help_text="The chat messages of the first ask (the labeler's shown order).")
    prompt_swapped = models.JSONField(help_text="The same with the two responses swapped.")
    a_first = models.BooleanField(help_text="True: the first ask showed response_a as (A).")
    answer_first = models.TextField(help_text="The model's raw answer to the first ask (untrusted text).")
    answer_swapped = models.TextField(help_text="The model's raw answer to the swapped ask (untrusted text).")
    choice_first = models.CharField(max_length=8, blank=True, help_text="The first answer in pair terms (a/b).")
    choice_swapped = models.CharField(max_length=8, blank=True, help_text="The swapped answer in pair terms.")
    prob_a_first = models.FloatField(null=True, blank=True,
                                     help_text="P(response_a better) from the first answer's log-probabilities.")
    prob_a_swapped = models.FloatField(null=True, blank=True,
                                       help_text="P(response_a better) from the swapped answer's log-probabilities.")
    outcome = models.CharField(max_length=10, choices=OUTCOMES)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]


class AIRevision(models.Model):
    """An AI labeler's proposal that its revision of a policy's answer is the better one (Constitutional AI's
    critique and revision, Bai et al. 2022, sec. 3): the pair of the original and the revision (on the side
    proposed_choice names) that people judge in the queue, the principle, and what the model was asked and
    answered."""

    labeler = models.ForeignKey(AILabeler, on_delete=models.PROTECT, related_name="revisions")
    pair = models.OneToOneField(Pair, on_delete=models.CASCADE, related_name="ai_revision")
    proposed_choice = models.CharField(max_length=8, default=Judgment.B,
                                       choices=[(Judgment.A, "the revision is response A"),
                                                (Judgment.B, "the revision is response B")],
                                       help_text="The AI's proposal in pair terms: the side holding the revision, "
                                                 "a or b (b before revisions went on either side).")
    model = models.CharField(max_length=500, help_text="The model that critiqued and revised, as the labeler named it.")
    policy = models.CharField(max_length=500, help_text="The policy checkpoint that wrote the original answer.")
    principle = models.TextField(help_text="The principle sampled from the labeler's constitution.")
    critique_prompt = models.JSONField(help_text="The chat messages of the critique request.")
    critique = models.TextField(help_text="The model's critique (untrusted text).")
    revision_prompt = models.JSONField(help_text="The chat messages of the revision request.")
    revision_answer = models.TextField(help_text="The model's raw answer to the revision request (untrusted text).")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return f"revision proposed on pair {self.pair_id}"

    def revised(self) -> Response:
        """The pair's response that is the AI's revision (the side proposed_choice names)."""
        return self.pair.response_a if self.proposed_choice == Judgment.A else self.pair.response_b

    def original(self) -> Response:
        """The pair's response that is the policy's original answer (the side proposed_choice does not name)."""
        return self.pair.response_b if self.proposed_choice == Judgment.A else self.pair.response_a

    @classmethod
    def accepted(cls, campaign: Campaign, rule: str) -> models.QuerySet:
        """The campaign's proposals a round learns from under `rule` (annotate.sources.CAI_ACCEPTS): "people", more
        than half of the pair's judgments by anyone but AI labelers prefer the revision; "ai", no more than half
        prefer the original (a pair nobody judged yet counts). A judgment is read by side: the one proposed_choice
        names is the revision's, the other the original's. Excluded judgments count for nobody."""
        from annotate.sources import ACCEPT_AI, ACCEPT_PEOPLE

        people = Judgment.objects.filter(pair=models.OuterRef("pair")).exclude(source=Judgment.AI).exclude(
            Exclusion.excluded_judgments(campaign))

        def count(judgments):
            counted = judgments.order_by().values("pair").annotate(n=models.Count("id")).values("n")
            return Coalesce(models.Subquery(counted), 0)

        counted = cls.objects.filter(pair__campaign=campaign).annotate(
            judged=count(people), revision=count(people.filter(choice=models.OuterRef("proposed_choice"))),
            original=count(people.filter(choice__in=(Judgment.A, Judgment.B)).exclude(
                choice=models.OuterRef("proposed_choice"))))
        if rule == ACCEPT_PEOPLE:
            return counted.filter(revision__gt=models.F("judged") - models.F("revision"))
        if rule == ACCEPT_AI:
            return counted.exclude(original__gt=models.F("judged") - models.F("original"))
        raise ValueError(f"unknown acceptance rule {rule!r}: use {ACCEPT_PEOPLE} or {ACCEPT_AI}")


class AILabelingRun(models.Model):
    """One run of an AI labeler over its campaign's queue, started and stopped from the campaign page by an
    admin (or `manage.py ai_label`, which runs in-process): the record of truth its Celery task writes to."""

    QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED = "queued", "running", "succeeded", "failed", "stopped"
    STATUSES = [(QUEUED, "queued"), (RUNNING, "running"), (SUCCEEDED, "finished"), (FAILED, "failed"),
                (STOPPED, "stopped")]
    LIVE = (QUEUED, RUNNING)

    labeler = models.ForeignKey(AILabeler, on_delete=models.CASCADE, related_name="runs")
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    count = models.PositiveIntegerField(help_text="Pairs asked for, judged or skipped (fewer if the queue runs dry).")
    status = models.CharField(max_length=10, choices=STATUSES, default=QUEUED)
    judged = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    disagreed = models.PositiveIntegerField(default=0, help_text="Verdicts whose two orders disagreed.")
    malformed = models.PositiveIntegerField(default=0, help_text="Verdicts with an answer naming neither response.")
    stop_requested = models.BooleanField(default=False, help_text="Set by the stop button; the run stops "
                                                                  "before its next pair.")
    error = models.TextField(blank=True, help_text="Why it failed.")
    note = models.CharField(max_length=200, blank=True, help_text="Why it ended before its count, when it did.")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Refreshed by the worker while it runs; a stale one fails the run.")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"run of {self.labeler} ({self.status})"

    def is_live(self) -> bool:
        return self.status in self.LIVE

    def done(self) -> int:
        return self.judged + self.skipped

    def progress_fraction(self) -> float:
        return min(1.0, self.done() / self.count) if self.count else 1.0
