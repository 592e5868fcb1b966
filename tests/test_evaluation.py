"""The evaluate job: three policies answer the evaluation set, a rule judge compares them; the table on the
round page and in the API, and evaluating a finished round again on demand."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from django.test import Client
from transformers import AutoModelForCausalLM

from annotate.actions import EvalInput, PairInput, add_eval_set, add_pairs
from demo.demo_tasks import make_prompts
from demo.tiny_models import build_policy
from tests.conftest import PASSWORD, make_campaign
from training import actions, runner
from training.config import build_config
from training.models import Job, Round

pytestmark = pytest.mark.django_db
MIN = 4
PROMPTS = 6


@pytest.fixture(autouse=True)
def quiet(settings, monkeypatch):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": MIN, "HEARTBEAT_STALE_SECONDS": 3600}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)


def mute(path: Path) -> str:
    """A tiny GPT-2 that ends its turn at once: its final norm's output is the end-of-text embedding, scaled."""
    model = AutoModelForCausalLM.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[eos] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embedding[eos] * 100)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> tuple[str, str]:
    """(a policy that answers, a policy that never does): the demo rule judge scores an empty answer 0."""
    root = tmp_path_factory.mktemp("policies")
    return str(build_policy("gpt2", root / "talker", seed=0)), mute(build_policy("gpt2", root / "mute", seed=1))


def campaign_with_eval_set():
    campaign = make_campaign(slug="evals")
    add_pairs(campaign, [PairInput(f"Question {i}?", f"good {i}", f"bad {i}", preferred="a") for i in range(MIN)],
              notify=False)
    add_eval_set(campaign, "demo tasks", [EvalInput(i + 1, p, "") for i, p in enumerate(make_prompts(PROMPTS, 0))])
    return campaign


def finished_round(campaign, policy: str, sft: str) -> Round:
    """A round whose jobs before the evaluation succeeded with `policy` as its new policy and `sft` as the SFT."""
    round_ = actions.launch_round(campaign, None, build_config("tiny", {"ppo_max_new_tokens": 6}), force=True)
    Round.objects.filter(pk=round_.pk).update(config={**round_.config, "base_policy": sft})
    for job in round_.jobs.exclude(kind=Job.EVALUATE).order_by("order"):
        assert actions.claim_job(job.pk, f"t-{job.pk}")[0] is not None
        actions.finish_job(job.pk, f"t-{job.pk}", result={},
                           round_fields={"policy_checkpoint": policy} if job.kind == Job.PPO else None)
    return Round.objects.get(pk=round_.pk)


def evaluate(round_: Round) -> dict:
    job = round_.jobs.filter(kind=Job.EVALUATE).order_by("-order").first()
    assert runner.execute(job.pk, f"eval-{job.pk}"), Job.objects.get(pk=job.pk).error
    return Job.objects.get(pk=job.pk).result


def row(result: dict, a: str, b: str) -> dict:
    return next(r for r in result["comparisons"] if (r["a"], r["b"]) == (a, b))


def test_an_evaluation_of_two_rounds_names_the_policy_that_answers_the_winner(policies, admin_user):
    talker, silent = policies
    campaign = campaign_with_eval_set()
    first = finished_round(campaign, talker, sft=silent)
    result = evaluate(first)
    assert [p["label"] for p in result["policies"]] == ["Round 1", "SFT policy"]
    assert result["judges"] == ["rule:correct_sentence"]
    beat_sft = row(result, "new", "sft")
    assert (beat_sft["wins"], beat_sft["ties"], beat_sft["losses"], beat_sft["win_rate"]) == (PROMPTS, 0, 0, 1.0)
    assert beat_sft["mean_length_a"] > 0 == beat_sft["mean_length_b"]
    # Every compared prompt keeps both policies' answers.
    assert len(result["answers"]) == PROMPTS and all(a["answers"]["sft"] == "" for a in result["answers"])
    assert all(a["answers"]["new"] for a in result["answers"])

    second = finished_round(campaign, silent, sft=silent)
    result = evaluate(second)
    assert [p["label"] for p in result["policies"]] == ["Round 2", "Round 1", "SFT policy"]
    assert row(result, "new", "previous")["win_rate"] == 0.0  # round 2 went back to silence: round 1 wins
    assert row(result, "new", "sft")["ties"] == PROMPTS  # same model, same seed: the same answers
    assert row(result, "previous", "sft")["win_rate"] == 1.0

    # The round page shows the table and the chart's data across rounds; the API the same as JSON.
    client = Client()
    client.login(username=admin_user.username, password=PASSWORD)
    page = client.get(f"/rounds/{second.pk}/").content.decode()
    assert 'id="evaluation-table"' in page and "<td>Round 1</td><td>SFT policy</td>" in page
    across = json.loads(page.split('id="evaluation-rounds" type="application/json">')[1].split("</script>")[0])
    assert [r["round"] for r in across] == [1, 2]
    from api.actions import create_token

    token = create_token(admin_user, "evaluation", ["review"])[1]
    body = Client().get(f"/api/v1/rounds/{second.pk}/evaluation", headers={"Authorization": f"Bearer {token}"}).json()
    assert {(r["a_label"], r["b_label"], r["win_rate"]) for r in body["table"]} == {
        ("Round 2", "Round 1", 0.0), ("Round 2", "SFT policy", 0.5), ("Round 1", "SFT policy", 1.0)}
    assert body["eval_set"]["prompts"] == PROMPTS and len(body["across_rounds"]) == 2


def test_a_round_of_a_campaign_without_an_evaluation_set_says_how_to_get_one(policies):
    campaign = make_campaign(slug="plain")
    add_pairs(campaign, [PairInput(f"Question {i}?", f"good {i}", f"bad {i}", preferred="a") for i in range(MIN)],
              notify=False)
    result = evaluate(finished_round(campaign, *policies))
    assert result["eval_set"] is None and "manage.py import_eval_set" in result["note"]


def test_a_finished_round_is_evaluated_again_on_demand_and_an_unfinished_one_is_refused(policies, admin_user):
    campaign = campaign_with_eval_set()
    round_ = actions.launch_round(campaign, None, build_config("tiny"))
    with pytest.raises(CommandError, match="only a round whose jobs all succeeded"):
        call_command("evaluate", str(round_.pk), stdout=io.StringIO())
    actions.cancel_job(round_.jobs.get(kind=Job.EXPORT))
    round_ = finished_round(campaign, *policies)
    evaluate(round_)
    call_command("evaluate", str(round_.pk), stdout=io.StringIO())
    kinds = list(round_.jobs.order_by("order").values_list("kind", "status"))
    assert kinds[-2:] == [(Job.EVALUATE, Job.SUCCEEDED), (Job.EVALUATE, Job.QUEUED)]
    assert round_.status() == Job.RUNNING  # its earlier jobs done, its new evaluation waiting for a worker
    # The API's door: refused (409) while that evaluation waits, accepted (202) once it is done.
    from api.actions import create_token

    api = Client(headers={"Authorization": f"Bearer {create_token(admin_user, 'evaluate', ['admin'])[1]}"})
    refused = api.post(f"/api/v1/rounds/{round_.pk}/evaluate")
    assert refused.status_code == 409 and "only a round whose jobs all succeeded" in refused.json()["detail"]
    evaluate(round_)
    accepted = api.post(f"/api/v1/rounds/{round_.pk}/evaluate")
    assert accepted.status_code == 202 and [j["kind"] for j in accepted.json()["jobs"]][-3:] == [Job.EVALUATE] * 3
