"""AI judges of a pair from a written principle, as Constitutional AI's feedback model (Bai et al. 2022, sec. 4.1).

A principle is asked as a multiple-choice question over the conversation and two responses, (A) and (B).
Every pair is asked twice, the responses swapped the second time, and a verdict is kept only when both
orders name the same response (the swap removes the position bias LLM judges show: Zheng et al. 2023,
"Judging LLM-as-a-judge", sec. 3.3). Where log-probabilities come back, the probability of the chosen
response is the normalised probability of its letter among the two, as the paper does.

Two askers: an OpenAI-compatible chat endpoint (vLLM, TGI, llama.cpp, Ollama, `transformers serve`), and a
local Hugging Face causal LM, whose answer is the likelier of the two letters as the first token of its reply.
Model outputs are untrusted text: they are parsed for a letter, stored, and nothing else.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Protocol

# The CAI paper's multiple-choice template (Bai et al. 2022, sec. 4.1), as one user turn.
QUESTION = """Consider the following conversation between a human and an assistant:
{conversation}
{principle}
Options:
(A) {first}
(B) {second}
The answer is:"""

LETTERS = ("A", "B")
# A reply names a response by its letter, alone or in parentheses, at its start ("A", "(B)", "Answer: (A)").
ANSWER = re.compile(r"^\W*(?:the\s+answer\s+is\W*|answer\W*)?\(?([AB])\b", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The model could not be asked (unreachable, timed out, refused after retries): the message says why."""


@dataclass(frozen=True)
class Answer:
    text: str
    """The model's reply as it came back (untrusted)."""
    letter: str | None
    """"A" or "B" as parsed from the reply; None when it names neither."""
    prob_first: float | None = None
    """P((A)) normalised over the two letters, from the reply's log-probabilities; None without them."""


class Asker(Protocol):
    model: str

    def ask(self, messages: list[dict[str, str]]) -> Answer: ...


def question(conversation: str, principle: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat messages asking `principle` about two responses, `first` shown as (A)."""
    text = QUESTION.format(conversation=conversation, principle=principle, first=first, second=second)
    return [{"role": "user", "content": text}]


def parse_letter(text: str) -> str | None:
    match = ANSWER.match(text or "")
    return match.group(1).upper() if match else None


def normalised(logprob_a: float | None, logprob_b: float | None) -> float | None:
    """P(A) among the two letters from their log-probabilities; a letter missing from the top ones counts 0."""
    if logprob_a is None and logprob_b is None:
        return None
    p_a = math.exp(logprob_a) if logprob_a is not None else 0.0
    p_b = math.exp(logprob_b) if logprob_b is not None else 0.0
    return p_a / (p_a + p_b)


@dataclass(frozen=True)
class Verdict:
    """One principle asked in both orders, in the pair's terms: "a" is response_a, "b" response_b."""

    first: Answer
    swapped: Answer
    a_first: bool
    """True: the first ask showed response_a as (A) (the swapped ask then shows it as (B))."""

    def choice(self, answer: Answer, a_as_first: bool) -> str:
        if answer.letter is None:
            return ""
        return "a" if (answer.letter == "A") == a_as_first else "b"

    @property
    def choice_first(self) -> str:
        return self.choice(self.first, self.a_first)

    @property
    def choice_swapped(self) -> str:
        return self.choice(self.swapped, not self.a_first)

    @property
    def malformed(self) -> bool:
        return not self.choice_first or not self.choice_swapped

    @property
    def agreed(self) -> bool:
        return not self.malformed and self.choice_first == self.choice_swapped

    def prob_a(self, answer: Answer, a_as_first: bool) -> float | None:
        if answer.prob_first is None:
            return None
        return answer.prob_first if a_as_first else 1.0 - answer.prob_first

    @property
    def prob_a_first(self) -> float | None:
        return self.prob_a(self.first, self.a_first)

    @property
    def prob_a_swapped(self) -> float | None:
        return self.prob_a(self.swapped, not self.a_first)


def ask_both_orders(asker: Asker, conversation: str, principle: str, response_a: str, response_b: str,
                    a_first: bool) -> tuple[Verdict, list[dict[str, str]], list[dict[str, str]]]:
    """Ask once as shown (response_a first when `a_first`), once swapped; returns the verdict and both prompts."""
    first, second = (response_a, response_b) if a_first else (response_b, response_a)
    prompt_first = question(conversation, principle, first, second)
    prompt_swapped = question(conversation, principle, second, first)
    verdict = Verdict(asker.ask(prompt_first), asker.ask(prompt_swapped), a_first)
    return verdict, prompt_first, prompt_swapped


class RateLimit:
    """At most `per_minute` calls a minute, spaced evenly (the caller sleeps until its turn)."""

    def __init__(self, per_minute: int):
        self.interval = 60.0 / per_minute
        self.next_at = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.interval


class EndpointAsker:
    """A model behind an OpenAI-compatible chat endpoint, asked with the `openai` client, greedy and short.

    The client retries connection errors, timeouts, 429 and 5xx answers `max_retries` times with exponential
    backoff; what still fails is a JudgeError naming the endpoint and the reason."""

    MAX_TOKENS = 8  # a letter, perhaps in parentheses or after "The answer is"

    def __init__(self, base_url: str, model: str, api_key: str = "", *, timeout: float = 60.0,
                 max_retries: int = 2, per_minute: int = 600):
        import openai  # loaded by an endpoint labeler only

        self.model, self.base_url = model, base_url
        self.errors = (openai.APIConnectionError, openai.APIStatusError, openai.APIResponseValidationError)
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=max_retries)
        self.rate = RateLimit(per_minute)

    def ask(self, messages: list[dict[str, str]]) -> Answer:
        self.rate.wait()
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.MAX_TOKENS, temperature=0.0,
                logprobs=True, top_logprobs=5)
        except self.errors as exc:
            raise JudgeError(f"the endpoint {self.base_url} failed: {type(exc).__name__}: {exc}") from exc
        if not reply.choices:
            raise JudgeError(f"the endpoint {self.base_url} answered with no choices")
        choice = reply.choices[0]
        text = choice.message.content or ""
        return Answer(text, parse_letter(text), self._prob_first(choice))

    @staticmethod
    def _prob_first(choice) -> float | None:
        """P((A)) from the top log-probabilities of the reply's first token that is a letter; None without them."""
        content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
        for token in content or []:
            if token.token.strip(" (").upper() not in LETTERS:
                continue
            found = {alt.token.strip(" (").upper(): alt.logprob for alt in token.top_logprobs or []}
            found.setdefault(token.token.strip(" (").upper(), token.logprob)
            return normalised(found.get("A"), found.get("B"))
        return None


class LocalAsker:
    """A local Hugging Face causal LM: its answer is the likelier of "A" and "B" as the reply's first token,
    under its chat template, and the probability is their normalised softmax (the letters' log-probabilities)."""

    def __init__(self, path: str, device: str = "auto", per_minute: int = 600):
        import torch

        from training.engine.common import apply_chat_template, has_chat_template, load_causal_lm, pick_device

        self.torch, self.apply_chat_template, self.has_chat_template = torch, apply_chat_template, has_chat_template
        self.model = path
        self.device = pick_device(device)
        self.lm, self.tokenizer = load_causal_lm(path, self.device)
        self.lm.eval()
        self.letter_ids = [self.tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
        self.rate = RateLimit(per_minute)

    def ask(self, messages: list[dict[str, str]]) -> Answer:
        self.rate.wait()
        if self.has_chat_template(self.tokenizer):
            text = self.apply_chat_template(self.tokenizer, messages, add_generation_prompt=True)
        else:
            text = messages[-1]["content"] + " ("
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        with self.torch.no_grad():
            logits = self.lm(ids).logits[0, -1]  # (V,) the next token after the prompt
        logprobs = self.torch.log_softmax(logits.float(), dim=-1)[self.letter_ids]  # (2,) log P(A), log P(B)
        prob_first = normalised(float(logprobs[0]), float(logprobs[1]))
        letter = "A" if prob_first >= 0.5 else "B"
        return Answer(letter, letter, prob_first)
