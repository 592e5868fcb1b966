"""The API's request and response bodies (pydantic, through django-ninja): what the OpenAPI schema shows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db.models import NOT_PROVIDED
from ninja import Schema
from pydantic import AfterValidator, Field

from annotate.actions import MAX_RUN_COUNT
from annotate.converters import SLUG_PATTERN
from annotate.limits import INT32_MAX, INT32_MIN
from annotate.models import CAMPAIGN_BOUNDS, AILabeler
from training.access import job_error_for


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class Error(Schema):
    detail: str = Field(description="What was wrong, for a person to read.")


class Invalid(Schema):
    detail: list[dict[str, Any]] = Field(description="Each invalid value: where it is (loc) and why (msg).")


class ImportError_(Schema):
    detail: str = Field(description="The first problems, as import_pairs prints them.")
    errors: list[str] = Field([], description="Every collected problem, naming the line (row) and field "
                                              "(none when the body itself is not JSON).")
    total: int = Field(0, description="How many problems the rows hold in all.")


class SettingsError(Schema):
    detail: str
    errors: dict[str, str] = Field({}, description="Each bad setting's name and what is wrong with it (none "
                                                   "when the body itself is not JSON).")


class CampaignOut(Schema):
    slug: str
    name: str
    instructions: str = Field(description="Markdown, shown to labelers.")
    allow_tie: bool
    allow_both_bad: bool
    ask_strength: bool
    ask_rationale: bool
    overlap: int = Field(description="Judgments wanted per pair.")
    tie_break_limit: int = Field(description="Extra judgments a pair whose judgments split may get.")
    lease_seconds: int
    daily_cap: int | None
    gold_rate: float
    content_warning: str = Field(description="Markdown shown before a labeler's first pair; empty: none.")
    min_new_share: float = Field(description="New judgments a launch needs without force, as a share of the "
                                             "pairs the last successful round sent back.")
    is_active: bool
    created_at: datetime
    choices: list[str] = Field(description="The choices a judgment may make here: a, b, tie, both_bad.")

    @staticmethod
    def resolve_choices(campaign) -> list[str]:
        return campaign.choices_offered()


def _bounded(name: str, **kwargs):
    """An optional campaign setting whose range is the model's (CAMPAIGN_BOUNDS)."""
    low, high = CAMPAIGN_BOUNDS[name]
    return Field(None, ge=low, le=high, **kwargs)


class CampaignSettings(Schema):
    """A campaign's settings as the admin edits them; on update, only the fields sent change. Only
    daily_cap takes null (no cap)."""

    name: Text = Field(None, min_length=1, max_length=200)
    instructions: Text = Field(None, description="Markdown, shown to labelers one click away.")
    allow_tie: bool = Field(None, description="Offer 'tie'.")
    allow_both_bad: bool = Field(None, description="Offer 'both bad'.")
    ask_strength: bool = Field(None, description="Ask how much better, 1 to 4.")
    ask_rationale: bool = Field(None, description="Offer an optional rationale.")
    overlap: int = _bounded("overlap", description="Judgments wanted per pair.")
    tie_break_limit: int = _bounded("tie_break_limit", description="Extra judgments a pair whose judgments "
                                                                   "split may get, one at a time; 0: none.")
    lease_seconds: int = _bounded("lease_seconds", description="A claimed pair returns to the queue after this.")
    daily_cap: int | None = _bounded("daily_cap", description="Judgments per labeler per day; null: no cap.")
    gold_rate: float = _bounded("gold_rate", description="Share of gold items mixed in.")
    content_warning: Text = Field(None, description="Markdown shown before a labeler's first pair.")
    min_new_share: float = _bounded("min_new_share", description="New judgments a launch needs without "
                                    "force, as a share of the pairs the last successful round sent back (0.1).")
    is_active: bool = Field(None)


class CampaignCreate(CampaignSettings):
    slug: str = Field(pattern=rf"^{SLUG_PATTERN}$", min_length=1, max_length=50)
    name: Text = Field(min_length=1, max_length=200)


class WebhookIn(Schema):
    url: str = Field(pattern=r"^https?://\S+$", max_length=500, description="Where the signed POSTs go.")
    events: list[Literal["round.succeeded", "round.failed", "campaign.queue_empty"]] = Field(
        [], description="Which events; all of them when empty.")


class DeliveryOut(Schema):
    id: int
    event: str
    status: str = Field(description="pending (being tried), delivered or failed.")
    attempts: int
    response_status: int | None
    error: str
    created_at: datetime
    delivered_at: datetime | None


RECENT_DELIVERIES = 10  # deliveries shown with each webhook


class WebhookOut(Schema):
    id: int
    url: str
    events: list[str]
    is_active: bool
    created_at: datetime
    deliveries: list[DeliveryOut] = Field(
        description=f"The latest {RECENT_DELIVERIES} deliveries, newest first.")

    @staticmethod
    def resolve_deliveries(webhook) -> list:
        return list(webhook.deliveries.all()[:RECENT_DELIVERIES])


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Checks the X-Pairloop-Signature header; shown only now.")


class Turn(Schema):
    role: str = Field(description="system, user or assistant.")
    content: str


PROMPT_TURNS = "A chat prompt's turns, as imported; null for a text prompt."


class AssignmentOut(Schema):
    id: int = Field(description="Send judgments and skips to this assignment.")
    pair_id: int
    prompt: str = Field(description="The prompt as text (a chat prompt's turns flattened, each after its role).")
    prompt_turns: list[Turn] | None = Field(description=PROMPT_TURNS)
    left: str = Field(description="The response shown as 'a'.")
    right: str = Field(description="The response shown as 'b'.")
    expires_at: datetime = Field(description="The lease ends then and the pair returns to the queue.")

    @staticmethod
    def resolve_prompt(assignment) -> str:
        return assignment.pair.prompt.text

    @staticmethod
    def resolve_prompt_turns(assignment) -> list | None:
        return assignment.pair.prompt.turns or None

    @staticmethod
    def resolve_left(assignment) -> str:
        return assignment.shown()[0].text

    @staticmethod
    def resolve_right(assignment) -> str:
        return assignment.shown()[1].text


class WarningPending(Schema):
    detail: str
    content_warning: str = Field(description="The campaign's warning (Markdown), to show before any pair.")


class Acknowledged(Schema):
    acknowledged_at: datetime


Choice = Literal["a", "b", "tie", "both_bad"]


class AxisOut(Schema):
    key: str = Field(description="The axis's name in `choices` and in exports (`axis=`).")
    question: str
    choices: list[str] = Field(description="The choices it offers: a, b, tie, both_bad.")
    ask_strength: bool

    @staticmethod
    def resolve_choices(axis) -> list[str]:
        return axis.choices_offered()


class ClaimOut(Schema):
    assignment: AssignmentOut | None
    reason: Literal["", "empty", "cap", "busy"] = Field(
        description="Why there is no assignment: empty (nothing left for you), cap (daily cap reached), "
                    "busy (others hold every open pair: try again).")
    choices: list[str]
    ask_strength: bool
    ask_rationale: bool
    axes: list[AxisOut] = Field(description="The questions asked on each pair, in order; the first is the one "
                                            "`choices` and `ask_strength` above describe.")
    judged_today: int
    left_in_campaign: int


class JudgmentIn(Schema):
    choice: Choice | None = Field(
        None, description="In shown terms: 'a' is the left response. On a campaign of one axis; with "
                          "several, give `choices`.")
    strength: int | None = Field(None, ge=1, le=4, description="1 (slightly) .. 4 (far) better; asked for "
                                                                 "a and b when the campaign asks strength.")
    choices: dict[str, Choice] | None = Field(
        None, description="One choice per axis, {axis key: choice} in shown terms: every axis of the "
                          "campaign, stored at once as one judgment of the pair.")
    strengths: dict[str, Annotated[int, Field(ge=1, le=4)]] | None = Field(
        None, description="With `choices`: {axis key: 1..4} for the axes that ask strength, on a or b.")
    rationale: Text = Field("", max_length=5000)
    milliseconds: int | None = Field(None, ge=0, le=INT32_MAX, description="Time from showing to choosing.")


class JudgmentOut(Schema):
    id: int
    pair_id: int
    choice: str = Field(description="In the pair's terms (response_a / response_b), as exports show it.")
    strength: int | None
    choices: dict[str, str] = Field(description="Every axis's choice, {axis key: choice}, in the pair's terms.")
    source: str
    created: bool = Field(description="False when this assignment was judged already (nothing changed).")
    next: ClaimOut | None = Field(None, description="With ?next=true: the next pair, leased as claim does, "
                                                    "so labeling is one round trip per judgment.")


class SkipOut(Schema):
    assignment_id: int
    skipped: bool


class UndoIn(Schema):
    judgment_id: int = Field(ge=1, le=2**63 - 1, description="The judgment to take back: your last one.")


class UndoOut(Schema):
    judgment_id: int
    pair_id: int


class ImportIn(Schema):
    rows: list[dict[str, Any]] = Field(description="Rows as import_pairs reads a JSONL file's lines: "
                                                   "prompt with response_a/response_b, responses, or "
                                                   "chosen/rejected.")
    pairs_per_prompt: int | None = Field(None, ge=1, le=1000)
    seed: int = Field(0, ge=0, le=INT32_MAX)
    priority: int = Field(0, ge=INT32_MIN, le=INT32_MAX)


class ImportOut(Schema):
    created: int
    skipped: int = Field(description="Duplicates of pairs already there.")
    rows: int


class ImportJobOut(Schema):
    id: int
    file_name: str
    status: str = Field(description="queued, checking, importing, succeeded or failed.")
    rows_done: int
    rows_total: int | None
    pairs_created: int
    pairs_skipped: int
    errors: list[str] = Field(description="Why it failed, naming the line (row) and field.")
    created_at: datetime
    finished_at: datetime | None


class QueueOut(Schema):
    pairs: int
    open_pairs: int
    judgments: int
    judgments_left: int = Field(description="Judgments still wanted (may lag by a few minutes).")
    live_leases: int
    pairs_by_judgments: dict[str, int] = Field(description="How many pairs have 0, 1, 2... judgments.")


class JobOut(Schema):
    id: int
    kind: str
    order: int
    status: str
    step: int
    total_steps: int
    progress: float
    result: dict[str, Any] = Field(description="Final metrics and outputs, once it succeeded.")
    last_metrics: dict[str, Any] | None = Field(description="The latest metric point.")
    error: str = Field(description="Why it failed: with its traceback for an admin's token, the summary (first "
                                   "paragraph) for a reviewer's, as the round page shows it.")
    warning: str
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def resolve_progress(job) -> float:
        return job.progress_fraction()

    @staticmethod
    def resolve_last_metrics(job) -> dict | None:
        return job.metrics[-1] if job.metrics else None

    @staticmethod
    def resolve_error(job, context) -> str:
        return job_error_for(context["request"].user, job)


class LaunchReport(Schema):
    """What a launch learns that the last round that succeeded did not."""

    usable: int = Field(description="Usable judgments now (A or B preferred).")
    new: int = Field(description="Usable judgments that arrived since the last successful round's export.")
    new_people: int = Field(description="Of them, made by people (the labeling page and the API).")
    new_simulated: int = Field(description="Of them, made by simulated labelers.")
    new_imported: int = Field(description="Of them, imported preferences.")
    since_round: int | None = Field(description="The last round that succeeded; null: none has.")
    unjudged_new_pairs: int = Field(description="That round's new pairs still without a judgment.")
    new_pairs: int = Field(description="The pairs that round sent back to the queue.")
    min_new_share: float = Field(description="The campaign's share of those pairs' worth of new judgments a "
                                             "launch needs unforced.")
    needed: int = Field(description="New usable judgments a launch needs unforced (at least one).")
    stale: bool = Field(description="True: a launch is refused unless forced.")
    forced: bool = Field(False, description="On a round: launched with force while stale.")


class RoundOut(Schema):
    id: int
    campaign: str
    number: int
    status: str
    algorithm: str = Field(description="How the round trains its policy: ppo, dpo or grpo (the setting "
                                       "`algorithm`; its jobs follow from it).")
    config: dict[str, Any]
    parent_policy: str
    policy_checkpoint: str
    reward_checkpoint: str
    created_at: datetime
    finished_at: datetime | None
    launch: LaunchReport | None = Field(description="What the round was launched with; null for rounds "
                                                    "launched before this was recorded.")
    jobs: list[JobOut]

    @staticmethod
    def resolve_campaign(round_) -> str:
        return round_.campaign.slug

    @staticmethod
    def resolve_launch(round_) -> dict | None:
        return round_.config.get("launch")


class RoundIn(Schema):
    preset: str = Field("demo", description="The settings to start from (demo or tiny); PAIRLOOP_DEMO_POLICY_"
                                            "PRESET on the page.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Round settings over the campaign's "
                                     "own (models, system prompt, generation) and the preset's, as launch_round "
                                     "--set takes them.")
    force: bool = Field(False, description="Launch even when too little is new since the last successful "
                                           "round (see the launch report).")


class SampleOut(Schema):
    prompt: str = Field(description="The prompt as text (a chat prompt's turns flattened, each after its role).")
    prompt_turns: list[Turn] | None = Field(description=PROMPT_TURNS)
    responses: list[str] = Field(description="What this round's policy wrote for the prompt.")


class EvalSetOut(Schema):
    id: int
    name: str
    version: str = Field(description="Hash of its prompts and references: the same content is the same version.")
    prompts: int


class EvalSetListedOut(Schema):
    id: int
    name: str = Field(description="What the admin called it (the file's name by default).")
    version: str = Field(description="Hash of its prompts and references: the same content is the same version.")
    prompts: int = Field(alias="prompt_count", description="How many prompts it holds.")
    created_at: datetime


class ComparisonOut(Schema):
    a: str = Field(description="The first policy's role: new (this round's), previous (the round before) or sft.")
    b: str = Field(description="The second policy's role.")
    a_label: str = Field(description="The first policy as the round page names it (\"Round 2\", \"SFT policy\").")
    b_label: str
    judge: str = Field(description="What compared them: rule:NAME, or the round's reward model.")
    axis: str = Field(description="The question judged; empty for the campaign's one question.")
    prompts: int
    wins: int = Field(description="Prompts where the first policy's answer won, asked in both orders.")
    ties: int
    losses: int
    win_rate: float | None = Field(description="The first policy's wins plus half its ties, over prompts.")
    ci_low: float | None = Field(description="95% percentile bootstrap interval of the win rate, prompts resampled.")
    ci_high: float | None
    lc_win_rate: float | None = Field(description="Length-controlled win rate: a logistic regression of the outcome "
                                                  "on the length difference, at a difference of zero.")
    mean_length_a: float | None = Field(description="Mean answer length of the first policy, in characters.")
    mean_length_b: float | None


class EvaluationRoundOut(Schema):
    round: int
    eval_set: EvalSetOut
    table: list[ComparisonOut]


class RatingOut(Schema):
    policy: str = Field(description="SFT policy, or Round N: whose checkpoint.")
    rating: float = Field(description="Elo scale, the SFT policy at 1000.")
    low: float = Field(description="Lower end of the 95% bootstrap interval.")
    high: float
    games: int

    @staticmethod
    def resolve_policy(rating) -> str:
        return str(rating.player)


class RatingsOut(Schema):
    axis: str = Field(description="The axis whose judgments these are (its key).")
    source: str = Field(description="Whose judgments: human, else simulated labelers.")
    judgments: int
    players: list[RatingOut]


class HumanEvaluationOut(Schema):
    table: list[ComparisonOut] = Field(description="The new policy against each other policy from the labelers' "
                                                   "blind judgments (judge people): prompts counts judgments, and "
                                                   "the interval resamples them.")
    ratings: RatingsOut | None = Field(description="Bradley-Terry ratings of the rounds' policies from every blind "
                                                   "judgment up to this round, with 95% bootstrap intervals.")


class EvaluationOut(Schema):
    job: int = Field(description="The evaluate job whose result this is (the round's last that succeeded).")
    eval_set: EvalSetOut | None = Field(description="What it was evaluated on; null when the campaign had none.")
    policies: list[dict[str, str]] = Field(description="Each policy's role, label and checkpoint.")
    judges: list[str]
    table: list[ComparisonOut]
    across_rounds: list[EvaluationRoundOut] = Field(description="The same table for each round up to this one.")
    note: str = Field(description="Why there is no table, when there is none.")
    human: HumanEvaluationOut | None = Field(description="The blind human evaluation, once labelers judged its pairs.")




class AILabelingRunOut(Schema):
    id: int
    labeler: str = Field(alias="labeler.name", description="The AI labeler's name.")
    count: int = Field(description="Pairs asked for, judged or skipped (fewer if the queue runs dry).")
    status: str = Field(description="queued, running, succeeded, failed or stopped.")
    judged: int
    skipped: int
    disagreed: int = Field(description="Verdicts whose two orders disagreed.")
    malformed: int = Field(description="Verdicts with an answer naming neither response.")
    stop_requested: bool
    error: str = Field(description="Why it failed.")
    note: str = Field(description="Why it ended before its count, when it did.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class PrincipleOut(Schema):
    text: str
    axis: str = Field(description="The axis it judges, by key; empty: the campaign's first.")


class AILabelerOut(Schema):
    id: int
    name: str
    kind: str = Field(description="endpoint or local.")
    base_url: str
    model: str
    api_key_env: str = Field(description="The environment variable the worker reads the key from (never the key).")
    principle_mode: str = Field(description="sample or all.")
    on_disagreement: str = Field(description="tie or skip.")
    requests_per_minute: int
    timeout_seconds: float
    max_retries: int
    principles: list[PrincipleOut] = Field(description="Its constitution, in order.")
    last_run: AILabelingRunOut | None = Field(description="Its latest run, if any.")

    @staticmethod
    def resolve_principles(labeler) -> list:
        return list(labeler.principles.all())

    @staticmethod
    def resolve_last_run(labeler):
        return labeler.last_run()


def _labeler_field(name: str, **kwargs):
    """An optional AI labeler setting: described by the model's help text, bounded by its validators; omitted,
    the model's default."""
    field = AILabeler._meta.get_field(name)
    lows = [v.limit_value for v in field.validators if isinstance(v, MinValueValidator)]
    highs = [v.limit_value for v in field.validators if isinstance(v, MaxValueValidator)]
    bounds = {**({"ge": max(lows)} if lows else {}), **({"le": min(highs)} if highs else {})}
    default = "" if field.default is NOT_PROVIDED else f" Default: {field.default}."
    what = field.help_text or "; ".join(f"{value}: {label}" for value, label in field.choices) + "."
    return Field(None, description=f"{what}{default}", **bounds, **kwargs)


class PrincipleIn(Schema):
    text: Text = Field(min_length=1, max_length=5000, description="A comparison question, in the CAI "
                                                                   "paper's multiple-choice style.")
    axis: Text = Field("", max_length=60, description="The axis it answers, by key; empty: the campaign's first.")


class PrinciplesIn(Schema):
    principles: list[PrincipleIn] = Field(max_length=1000, description="The constitution: every "
                                          "axis of the campaign answered by at least one principle.")


class AILabelerIn(PrinciplesIn):
    """A new AI labeler; settings left out take the model's defaults."""

    name: str = Field(pattern=r"^[-a-zA-Z0-9_]+$", min_length=1, max_length=60,
                      description="Unique in the campaign; names its account ai-<campaign>-<name>.")
    kind: Literal["endpoint", "local"] = _labeler_field("kind")
    base_url: Text = _labeler_field("base_url", max_length=500)
    model: Text = Field(min_length=1, max_length=500, description="The model's name at the endpoint, or a local "
                                                                  "path on the worker.")
    api_key_env: Text = _labeler_field("api_key_env", max_length=100)
    principle_mode: Literal["sample", "all"] = _labeler_field("principle_mode")
    on_disagreement: Literal["tie", "skip"] = _labeler_field("on_disagreement")
    requests_per_minute: int = _labeler_field("requests_per_minute")
    timeout_seconds: float = _labeler_field("timeout_seconds", allow_inf_nan=False)
    max_retries: int = _labeler_field("max_retries")


class AILabelingRunIn(Schema):
    count: int = Field(ge=1, le=MAX_RUN_COUNT, description="Pairs to take, judged or skipped.")
