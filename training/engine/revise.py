"""Critique and revise: Constitutional AI's supervised stage (Bai et al. 2022, sec. 3.1).

A feedback model reads a conversation and the policy's answer, is asked to critique the answer by one
principle (a critique request), then to rewrite it (a revision request); the revision, preferred to the
original, is what the supervised stage learns from. The paper writes one critique and one revision request per
principle; here both are derived from a comparison principle (the AI labelers' constitution) by the fixed
templates below, so one constitution serves both stages and nothing more is written per principle.

Two writers answer in free text: an OpenAI-compatible chat endpoint and a local Hugging Face causal LM, both
greedy. Model outputs are untrusted text: stored and shown escaped, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# The paper's harmlessness requests (Bai et al. 2022, appendix C), with the principle in place of the list of
# harms: "Identify specific ways in which the assistant's last response is harmful, unethical, ..." and
# "Please rewrite the assistant response to remove any and all harmful, unethical, ... content."
CRITIQUE_REQUEST = ("Identify specific ways in which the assistant's last response falls short of this principle: "
                    "{principle}")
REVISION_REQUEST = ("Please rewrite the assistant's last response so that it meets this principle better: "
                    "{principle} Answer with the rewritten response only.")

MAX_NEW_TOKENS = 256  # a critique or a revision; the demo policy's answers are far shorter


class Writer(Protocol):
    model: str

    def write(self, messages: list[dict[str, str]]) -> str: ...


@dataclass(frozen=True)
class Revision:
    """One answer critiqued and revised by one principle: what was asked and what came back (untrusted)."""

    critique_messages: list[dict[str, str]]
    critique: str
    revision_messages: list[dict[str, str]]
    revision: str

    def improves_on(self, original: str) -> bool:
        """A revision to propose: not empty, and not the original again (whitespace aside)."""
        return bool(self.revision.strip()) and self.revision.strip() != original.strip()


def critique_and_revise(writer: Writer, conversation: list[dict[str, str]], answer: str, principle: str) -> Revision:
    """Ask `writer` to critique `answer` (the assistant's reply to `conversation`) by `principle`, then to revise it,
    the critique kept in the conversation as the paper does."""
    shown = [*conversation, {"role": "assistant", "content": answer}]
    critique_messages = [*shown, {"role": "user", "content": CRITIQUE_REQUEST.format(principle=principle.strip())}]
    critique = writer.write(critique_messages)
    revision_messages = [*critique_messages, {"role": "assistant", "content": critique},
                         {"role": "user", "content": REVISION_REQUEST.format(principle=principle.strip())}]
    return Revision(critique_messages, critique, revision_messages, writer.write(revision_messages))


class EndpointWriter:
    """A model behind an OpenAI-compatible chat endpoint, asked greedily; what fails after the client's retries
    raises `error` (the judge's JudgeError when the caller passes it) naming the endpoint and the reason."""

    def __init__(self, base_url: str, model: str, api_key: str = "", *, timeout: float = 60.0, max_retries: int = 2,
                 max_new_tokens: int = MAX_NEW_TOKENS, error: type[Exception] = RuntimeError):
        import openai  # loaded by an endpoint writer only

        self.model, self.base_url, self.max_new_tokens, self.error = model, base_url, max_new_tokens, error
        self.errors = (openai.APIConnectionError, openai.APIStatusError, openai.APIResponseValidationError)
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=max_retries)

    def write(self, messages: list[dict[str, str]]) -> str:
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages,
                                                        max_tokens=self.max_new_tokens, temperature=0.0)
        except self.errors as exc:
            raise self.error(f"the endpoint {self.base_url} failed: {type(exc).__name__}: {exc}") from exc
        return (reply.choices[0].message.content or "") if reply.choices else ""


class LocalWriter:
    """A local Hugging Face causal LM, greedy, under its chat template (a base model sees the turns as plain
    "Role: text" lines); the reply is the new tokens, special tokens left out."""

    def __init__(self, path: str, device: str = "auto", max_new_tokens: int = MAX_NEW_TOKENS):
        import torch

        from training.engine.common import load_causal_lm, pick_device

        self.torch, self.model, self.max_new_tokens = torch, path, max_new_tokens
        self.device = pick_device(device)
        self.lm, self.tokenizer = load_causal_lm(path, self.device)
        self.lm.eval()

    def render(self, messages: list[dict[str, str]]) -> str:
        from training.engine.common import apply_chat_template, has_chat_template

        if has_chat_template(self.tokenizer):
            return apply_chat_template(self.tokenizer, messages, add_generation_prompt=True)
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"

    def write(self, messages: list[dict[str, str]]) -> str:
        encoded = self.tokenizer(self.render(messages), return_tensors="pt", add_special_tokens=False).to(self.device)
        config = self.lm.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        # A reply takes at most a quarter of the positions, so that a small model's critique leaves room for the
        # revision request after it.
        room = min(positions - encoded.input_ids.shape[1], positions // 4, self.max_new_tokens)
        if room <= 0:
            return ""  # the conversation fills the model's positions: nothing it could write
        with self.torch.no_grad():
            out = self.lm.generate(**encoded, max_new_tokens=room, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, encoded.input_ids.shape[1]:], skip_special_tokens=True).strip()
