"""The demo instruction data: task families with checkable answers, each answered in several styles.

Real RLHF starts from demonstrations that vary and labelers who prefer some of them (Ouyang et
al. 2022). This module makes a small, fully checkable version of that world, so the whole loop
(SFT -> preferences -> reward model -> PPO) can run and be judged by a rule on a laptop:

- families: arithmetic, reversing words, sorting words, picking the items of a category out of a
  list, rewriting a blunt request politely. Every prompt carries everything needed to recover the
  correct answer from its text alone (`parse_task`), so a judge works on text from the labeling app.
- styles: "terse" (the bare answer), "sentence" (a full sentence that restates the question),
  "padded" (chatty filler around the answer), "curt" (a rude opener before the answer). The SFT
  data mixes them (STYLE_WEIGHTS), so the SFT policy samples a mixture preferences can shape.
- rule judges (`RULE_JUDGES`, used as `rule:NAME`): correctness first, then a preferred style, then
  small penalties for garbage and length, as AlpacaFarm's simulated annotators stood in for people
  (Dubois et al. 2023); and "respectful", which only dislikes the curt style's rude openers (the demo
  campaign's second axis).

Prompts are split train/heldout by a hash of their text, so a held-out prompt never appears in
the SFT data.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

FAMILIES: tuple[str, ...] = ("arithmetic", "reverse", "sort", "category", "polite")
STYLES: tuple[str, ...] = ("terse", "sentence", "padded", "curt")
PREFERRED_STYLE = "sentence"
# The SFT mixture: the preferred style is deliberately the rarest, so preferences have room to act.
STYLE_WEIGHTS: dict[str, float] = {"terse": 0.3, "sentence": 0.2, "padded": 0.25, "curt": 0.25}
# SFT examples per family, relative: copying a request politely is learnt fastest, adding digits
# and sorting slowest. Doubling arithmetic in the 5-minute build raised its correct answers from 30% to
# 48% and cost category (58% -> 24%) and sort (56% -> 34%): the budget is shared.
SFT_FAMILY_WEIGHTS: dict[str, int] = {"arithmetic": 2, "reverse": 2, "sort": 2, "category": 2, "polite": 1}
# How a judge ranks the styles it does not prefer (1.0 goes to the preferred one).
STYLE_RANK: dict[str, float] = {"terse": 0.4, "sentence": 0.4, "padded": 0.2, "curt": 0.0}
HELDOUT_PERCENT = 20

WORDS = (
    "apple river stone cloud garden window candle forest bridge silver market pencil mirror "
    "island rocket basket meadow violin ladder harbor jacket lemon tunnel castle feather orbit "
    "pepper saddle marble winter summer autumn spring planet copper velvet canyon desert "
    "engine falcon glacier hollow jungle kettle lantern magnet needle ocean pillow quartz "
    "ribbon shadow thunder umbrella valley wagon yellow zebra anchor button cactus dragon "
    "eagle fabric guitar hammer igloo jigsaw koala lizard mango nickel oyster parrot quiver "
    "rabbit sandal tiger vessel walnut yogurt acorn blossom cobalt dolphin ember fossil "
    "goblet helmet ivory jasmine kernel lobster mitten nectar olive puzzle raven sponge "
    "tulip velour willow beacon cradle drizzle fiddle gravel hazel insect juniper"
).split()

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "cow", "sheep", "lion", "mouse", "fox", "wolf", "bear", "goat", "duck", "frog", "owl"),
    "fruits": ("apple", "banana", "pear", "plum", "cherry", "grape", "lemon", "mango", "peach", "melon", "kiwi", "fig"),
    "colors": ("red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink", "gray", "violet", "beige"),
    "tools": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers", "spanner", "axe", "file", "trowel"),
    "vehicles": ("car", "bus", "truck", "bike", "train", "boat", "plane", "tram", "van", "ship", "taxi", "scooter"),
}

REQUESTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pass", ("the salt", "the bread", "the water", "the butter", "the pepper")),
    ("close", ("the door", "the window", "the gate", "the box")),
    ("open", ("the door", "the window", "the box", "the jar")),
    ("bring", ("me a chair", "me the book", "me some tea", "me the keys")),
    ("turn off", ("the light", "the radio", "the oven", "the tap")),
    ("turn on", ("the light", "the fan", "the radio", "the heater")),
    ("send", ("me the report", "me the file", "the letter", "the package")),
    ("clean", ("the kitchen", "the table", "your room", "the car")),
    ("call", ("me later", "the doctor", "your sister", "the office")),
    ("wait", ("outside", "here", "for me", "a moment")),
    ("move", ("your bag", "the chair", "the car", "the boxes")),
    ("fix", ("the sink", "the bike", "the printer", "the roof")),
    ("read", ("this letter", "the notes", "the map", "the menu")),
    ("check", ("the oven", "the mail", "the tires", "the schedule")),
    ("lower", ("your voice", "the music", "the blinds")),
    ("feed", ("the cat", "the dog", "the fish")),
    ("water", ("the plants", "the garden", "the roses")),
    ("sign", ("the form", "this paper", "the card")),
    ("hold", ("the door", "my bag", "the ladder")),
    ("buy", ("some milk", "more bread", "the tickets")),
)
REQUEST_SUFFIXES = ("", " now", " right now", " today", " quickly", " soon", " for me", " for me now")

PADDED_OPENERS = (
    "Sure, I would be glad to help with that!",
    "Great question! Let me work through it for you.",
    "Of course! Happy to help.",
    "What a fun little task!",
)
PADDED_CLOSERS = (
    "I hope this helps, and let me know if you need anything else!",
    "Feel free to ask if you have more questions!",
    "Have a wonderful day!",
)
CURT_OPENERS = ("Fine.", "Obviously:", "Whatever.", "Ugh, fine:", "Too easy:")

# Instruction phrasings per family: the text a labeler sees. Each has a regex that parses it back.
_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."),
    "reverse": ("Reverse the order of these words: {words}", "Write these words in reverse order: {words}"),
    "sort": ("Sort these words alphabetically: {words}", "Put these words in alphabetical order: {words}"),
    "category": ("List the {category} in this list: {items}.", "Which of these are {category}: {items}?"),
    "polite": ("Rewrite this politely: {request}.", "Make this request polite: {request}."),
}
_WORD = r"[A-Za-z]+"
_LIST = rf"{_WORD}(?:\s*,\s*{_WORD})*"
_PARSERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("arithmetic", re.compile(r"^(?:What is|Compute|Calculate)\s+(?P<a>-?\d+)\s*(?P<op>[+-])\s*(?P<b>-?\d+)\s*[?.]?$", re.I)),
    ("reverse", re.compile(rf"^(?:Reverse the order of these words|Write these words in reverse order):\s*(?P<words>{_WORD}(?:\s+{_WORD})*)\s*$", re.I)),
    ("sort", re.compile(rf"^(?:Sort these words alphabetically|Put these words in alphabetical order):\s*(?P<words>{_LIST})\s*$", re.I)),
    ("category", re.compile(rf"^(?:List the (?P<c1>[a-z]+) in this list|Which of these are (?P<c2>[a-z]+)):\s*(?P<items>{_LIST})\s*[.?]?$", re.I)),
    ("polite", re.compile(r"^(?:Rewrite this politely|Make this request polite):\s*(?P<request>[a-z][a-z ']*?)\s*[.!]?$", re.I)),
)

# Sentence-style templates: a full sentence that restates the question around the answer.
_SENTENCE = {
    "arithmetic": "{a} {op_word} {b} is {ans}",
    "reverse": "The words in reverse order are: {ans}",
    "sort": "In alphabetical order, the words are: {ans}",
    "category": "The {category} in the list are: {ans}",
    "polite": "A polite way to say it is: {ans}",
}
# What a well-formed answer of each family looks like (lower-cased, final period removed).
_WELL_FORMED = {
    "arithmetic": re.compile(r"-?\d+"),
    "reverse": re.compile(r"[a-z]+(?: [a-z]+)*"),
    "sort": re.compile(r"[a-z]+(?:, [a-z]+)*"),
    "category": re.compile(r"[a-z]+(?:, [a-z]+)*"),
    "polite": re.compile(r"could you please [a-z][a-z ']*\?"),
}


@dataclass
class Task:
    family: str
    instruction: str  # the full user-facing prompt text
    answer: str  # the canonical correct answer (terse form)
    fields: dict | None = None  # what the instruction was built from (numbers, words, category ...)


# ----------------------------------------------------------------------------------------------
# Making tasks


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _problem_key(family: str, fields: dict) -> str:
    """The problem behind a prompt, whatever its phrasing: the unit of the train/heldout split."""
    return json.dumps([family, fields], sort_keys=True)


def _in_heldout(key: str) -> bool:
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def is_heldout(instruction: str) -> bool:
    """A fixed hash split of problems (not phrasings): about HELDOUT_PERCENT% of them are held out,
    so a held-out problem never appears in training, not even asked another way."""
    task = parse_task(instruction)
    key = _problem_key(task.family, task.fields) if task else _normalize(instruction).lower()
    return _in_heldout(key)


def _solve(family: str, fields: dict) -> str:
    if family == "arithmetic":
        value = fields["a"] + fields["b"] if fields["op"] == "+" else fields["a"] - fields["b"]
        return str(value)
    if family == "reverse":
        return " ".join(reversed(fields["words"]))
    if family == "sort":
        return ", ".join(sorted(fields["words"]))
    if family == "category":
        members = set(CATEGORIES[fields["category"]])
        return ", ".join(item for item in fields["items"] if item in members)
    if family == "polite":
        return f"Could you please {fields['request']}?"
    raise ValueError(f"unknown family {family!r}")


def _instruction(family: str, fields: dict, phrasing: int) -> str:
    template = _INSTRUCTIONS[family][phrasing % len(_INSTRUCTIONS[family])]
    if family == "arithmetic":
        return template.format(a=fields["a"], op=fields["op"], b=fields["b"])
    if family == "reverse":
        return template.format(words=" ".join(fields["words"]))
    if family == "sort":
        return template.format(words=", ".join(fields["words"]))
    if family == "category":
        return template.format(category=fields["category"], items=", ".join(fields["items"]))
    return template.format(request=fields["request"])


def _random_fields(family: str, rng: random.Random) -> dict:
    # Sizes chosen so a 4-layer GPT-2 trained for five minutes gets most answers right but not all:
    # copying and reversing are learnt first, sorting and carrying digits last.
    if family == "arithmetic":  # a two-digit number plus or minus a digit, no carry or borrow
        op = rng.choice("+-")
        tens, units = rng.randint(1, 9), rng.randint(0, 9)
        if units == 9:
            op = "-"
        elif units == 0:
            op = "+"
        b = rng.randint(1, 9 - units) if op == "+" else rng.randint(1, units)
        return {"a": 10 * tens + units, "op": op, "b": b}
    if family == "reverse":
        return {"words": rng.sample(WORDS, rng.randint(3, 4))}
    if family == "sort":  # distinct first letters: the order depends on each word's first letter only
        by_letter: dict[str, list[str]] = {}
        for word in WORDS:
            by_letter.setdefault(word[0], []).append(word)
        letters = rng.sample(sorted(by_letter), rng.randint(3, 4))
        return {"words": [rng.choice(by_letter[letter]) for letter in letters]}
    if family == "category":
        category = rng.choice(sorted(CATEGORIES))
        n_members = 1 if rng.random() < 0.7 else 2
        n_others = rng.randint(2, 3)
        others = [w for c, ws in sorted(CATEGORIES.items()) if c != category for w in ws]
        items = rng.sample(CATEGORIES[category], n_members) + rng.sample(others, n_others)
        rng.shuffle(items)
        return {"category": category, "items": items}
    if family == "polite":
        verb, objects = rng.choice(REQUESTS)
        return {"request": f"{verb} {rng.choice(objects)}{rng.choice(REQUEST_SUFFIXES)}"}
    raise ValueError(f"unknown family {family!r}")


def make_tasks(n: int, seed: int, split: str = "train", families: tuple[str, ...] | list[str] | None = None) -> list[Task]:
    """`n` distinct tasks of the given split ("train" or "heldout"), families drawn uniformly."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    families = tuple(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families: {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    rng = random.Random(f"demo-tasks:{seed}:{split}")
    want_heldout = split == "heldout"
    tasks: list[Task] = []
    seen: set[str] = set()
    while len(tasks) < n:
        family = families[len(tasks) % len(families)]  # round-robin: every family equally often
        for attempt in range(200):  # a small family's space runs out: then repeats are allowed
            fields = _random_fields(family, rng)
            instruction = _instruction(family, fields, rng.randrange(8))
            if _in_heldout(_problem_key(family, fields)) == want_heldout and (instruction not in seen or attempt >= 20):
                break
        else:
            raise RuntimeError(f"could not draw a {split} task of family {family!r}")
        seen.add(instruction)
        tasks.append(Task(family, instruction, _solve(family, fields), fields))
    return tasks


def make_prompts(n: int, seed: int, split: str = "heldout", families=None) -> list[str]:
    """Instructions only: what a campaign shows or a sampler feeds the policy."""
    return [t.instruction for t in make_tasks(n, seed, split, families)]


# ----------------------------------------------------------------------------------------------
# Answering in a style


def _with_period(answer: str) -> str:
    return answer if answer[-1:] in ".?!" else answer + "."


def _sentence(task: Task, answer: str) -> str:
    fields = task.fields
    if fields is None:
        parsed = parse_task(task.instruction)
        fields = parsed.fields if parsed else {}
    text = _SENTENCE[task.family].format(
        a=fields.get("a", ""), b=fields.get("b", ""), op_word="plus" if fields.get("op") == "+" else "minus",
        category=fields.get("category", ""), ans=answer,
    )
    return _with_period(text)


def respond(task: Task, style: str, rng: random.Random, answer: str | None = None) -> str:
    """`task` answered in `style`; `answer` (default: the correct one) lets callers make wrong answers."""
    answer = task.answer if answer is None else answer
    if style == "terse":
        return answer
    if style == "sentence":
        return _sentence(task, answer)
    if style == "padded":
        return f"{rng.choice(PADDED_OPENERS)} Here it is: {_with_period(answer)} {rng.choice(PADDED_CLOSERS)}"
    if style == "curt":
        return f"{rng.choice(CURT_OPENERS)} {_with_period(answer)}"
    raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")


def make_sft_examples(n: int, seed: int, style_weights: dict[str, float] | None = None,
                      family_weights: dict[str, int] | None = None) -> list[dict]:
    """SFT rows {instruction, input, output, family, style} from train-split tasks, styles mixed.

    Families come in proportion to SFT_FAMILY_WEIGHTS: the slow-to-learn ones get more examples.
    """
    weights = style_weights or STYLE_WEIGHTS
    families = [f for f, count in (family_weights or SFT_FAMILY_WEIGHTS).items() for _ in range(count)]
    rng = random.Random(f"demo-sft:{seed}")
    styles = list(weights)
    rows = []
    for task in make_tasks(n, seed, "train", families=families):
        style = rng.choices(styles, weights=[weights[s] for s in styles])[0]
        rows.append({"instruction": task.instruction, "input": "", "output": respond(task, style, rng),
                     "family": task.family, "style": style})
    return rows


# ----------------------------------------------------------------------------------------------
# Reading a response back


def parse_task(instruction: str) -> Task | None:
    """The task behind a prompt's text (or a full Alpaca-formatted prompt), or None if not a demo task."""
    text = instruction
    if "### Instruction:" in text:
        text = text.split("### Instruction:", 1)[1].split("\n### ", 1)[0]
    text = _normalize(text)
    for family, pattern in _PARSERS:
        match = pattern.match(text)
        if not match:
            continue
        groups = match.groupdict()
        if family == "arithmetic":
            fields = {"a": int(groups["a"]), "op": groups["op"], "b": int(groups["b"])}
        elif family == "reverse":
            fields = {"words": groups["words"].lower().split()}
        elif family == "sort":
            fields = {"words": _split_list(groups["words"])}
        elif family == "category":
            category = (groups["c1"] or groups["c2"]).lower()
            if category not in CATEGORIES:
                return None
            fields = {"category": category, "items": _split_list(groups["items"])}
        else:
            fields = {"request": groups["request"].lower().strip()}
        return Task(family, text, _solve(family, fields), fields)
    return None


def _split_list(text: str) -> list[str]:
    return [part.strip().lower() for part in re.split(r",|\band\b", text) if part.strip()]


def _clean_answer(text: str) -> str:
    text = _normalize(text).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _style_patterns(task: Task) -> list[tuple[str, re.Pattern[str]]]:
    ans = "(?P<ans>.+?)"
    alternatives = lambda options: "(?:" + "|".join(re.escape(o) for o in options) + ")"  # noqa: E731
    sentence = re.escape(_sentence(task, "\x00").rstrip(".")).replace(re.escape("\x00"), ans)
    return [
        ("padded", re.compile(rf"^{alternatives(PADDED_OPENERS)}\s+Here it is:\s+{ans}\s+{alternatives(PADDED_CLOSERS)}$", re.I)),
        ("curt", re.compile(rf"^{alternatives(CURT_OPENERS)}\s+{ans}$", re.I)),
        ("sentence", re.compile(rf"^{sentence}\.?$", re.I)),
        ("terse", re.compile(rf"^{ans}$", re.I)),
    ]


def _read(task: Task, response: str) -> tuple[str | None, str]:
    """(style, answer text) of a response: the first style template whose answer slot is well formed."""
    text = _normalize(response)
    for style, pattern in _style_patterns(task):
        match = pattern.match(text)
        if match:
            answer = _clean_answer(match.group("ans"))
            if _WELL_FORMED[task.family].fullmatch(answer):
                return style, answer
    return None, _clean_answer(text)


def _answer_is_right(task: Task, answer: str) -> bool:
    if task.family == "arithmetic":
        return answer == task.answer
    if task.family == "reverse":
        return answer.split() == task.answer.lower().split()
    if task.family == "sort":
        return _split_list(answer) == _split_list(task.answer)
    if task.family == "category":
        given = _split_list(answer)
        return len(given) == len(set(given)) and set(given) == set(_split_list(task.answer))
    return answer.rstrip("?. ") == task.answer.lower().rstrip("?. ")


def _partial_credit(task: Task, answer: str) -> float:
    """How close a (possibly unparsed) answer is to the right one, in [0, 1]."""
    if task.family == "arithmetic":
        numbers = re.findall(r"-?\d+", answer)
        if not numbers:
            return 0.0
        return 1.0 / (1.0 + abs(int(numbers[-1]) - int(task.answer)))
    if task.family in ("reverse", "sort"):
        got = re.findall(r"[a-z]+", answer)
        want = re.findall(r"[a-z]+", task.answer.lower())
        return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want), 1)
    if task.family == "category":
        got, want = set(re.findall(r"[a-z]+", answer)), set(_split_list(task.answer))
        return len(got & want) / max(len(got | want), 1)
    got, want = set(re.findall(r"[a-z']+", answer)), set(re.findall(r"[a-z']+", task.answer.lower()))
    return 0.3 * ("please" in got) + 0.7 * len(got & want) / max(len(got | want), 1)


def is_correct(instruction: str, response: str) -> bool:
    """Whether the response gives the task's right answer in one of the known styles."""
    task = parse_task(instruction)
    if task is None:
        return False
    style, answer = _read(task, response)
    return style is not None and _answer_is_right(task, answer)


def detect_style(instruction: str, response: str) -> str | None:
    """Which of STYLES the response is written in (right or wrong answer), or None."""
    task = parse_task(instruction)
    return None if task is None else _read(task, response)[0]


def _cleanliness(response: str) -> float:
    """1 for tidy text; lower for repeated words and non-ASCII bytes (typical of a degenerate policy)."""
    words = response.lower().split()
    if not words:
        return 0.0
    distinct = len(set(words)) / len(words)
    ascii_share = sum(ch.isascii() and (ch.isprintable() or ch in "\n\t") for ch in response) / len(response)
    return distinct * ascii_share


def judge_score(instruction: str, response: str, prefer_style: str | None = PREFERRED_STYLE) -> float:
    """A rule judge's score in [0, 1]: correctness dominates, then style, then tidiness and brevity.

    correct answers score >= 0.65 and wrong ones < 0.5; among correct answers the preferred
    style scores >= 0.9 and others < 0.9. `prefer_style=None` judges correctness alone (plus
    partial credit for near misses). Non-demo prompts score 0.
    """
    task = parse_task(instruction)
    if task is None or not response.strip():
        return 0.0
    style, answer = _read(task, response)
    correct = style is not None and _answer_is_right(task, answer)
    partial = 1.0 if correct else min(0.9, _partial_credit(task, answer))
    if prefer_style is None:
        return 0.8 * correct + 0.2 * partial
    style_term = 0.0 if style is None else (1.0 if style == prefer_style else STYLE_RANK.get(style, 0.0))
    brevity = 1.0 / (1.0 + len(response) / 100.0)
    return 0.5 * correct + 0.25 * style_term + 0.15 * partial + 0.05 * _cleanliness(response) + 0.05 * brevity


def _judge(prefer_style: str | None) -> Callable[[str, str], float]:
    def judge(instruction: str, response: str) -> float:
        return judge_score(instruction, response, prefer_style=prefer_style)

    judge.__name__ = f"correct_{prefer_style}" if prefer_style else "correct"
    judge.__doc__ = ("Correctness, partial credit for near misses." if prefer_style is None
                     else f"Correctness first, then the {prefer_style!r} style, then tidiness and brevity.")
    return judge


def is_curt(response: str) -> bool:
    """Whether the response opens with one of the curt style's rude openers (CURT_OPENERS), right answer or not."""
    text = _normalize(response).lower()
    return any(text.startswith(opener.lower()) for opener in CURT_OPENERS)


def respectful_score(instruction: str, response: str) -> float:
    """Respect alone: 0 for a response that opens rudely (the curt style), 1 for any other."""
    return 0.0 if is_curt(response) else 1.0


RULE_JUDGES: dict[str, Callable[[str, str], float]] = {"correct": _judge(None)}
RULE_JUDGES.update({f"correct_{style}": _judge(style) for style in STYLES})
RULE_JUDGES["respectful"] = respectful_score
DEFAULT_RULE_JUDGE = f"correct_{PREFERRED_STYLE}"


def judge_description(name: str) -> str:
    """One line saying what a rule judge prefers (shown beside simulated labelers)."""
    if name not in RULE_JUDGES:
        raise KeyError(f"unknown rule judge {name!r} (known: {', '.join(RULE_JUDGES)})")
    return RULE_JUDGES[name].__doc__ or name


def evaluate(instructions: list[str], responses: list[str], prefer_style: str = PREFERRED_STYLE) -> dict[str, float]:
    """Summary of responses to demo prompts: correctness per family, style mix, mean judge score."""
    per_family: dict[str, list[bool]] = {}
    styles: dict[str, int] = {s: 0 for s in (*STYLES, "none")}
    scores = []
    for instruction, response in zip(instructions, responses):
        task = parse_task(instruction)
        if task is None:
            continue
        per_family.setdefault(task.family, []).append(is_correct(instruction, response))
        styles[detect_style(instruction, response) or "none"] += 1
        scores.append(judge_score(instruction, response, prefer_style))
    n = max(len(scores), 1)
    out = {"demo/judge_mean": sum(scores) / n,
           "demo/correct": sum(sum(v) for v in per_family.values()) / n}
    out.update({f"demo/correct_{f}": sum(v) / len(v) for f, v in sorted(per_family.items())})
    out.update({f"demo/style_{s}": c / n for s, c in styles.items()})
    return out


__all__ = [
    "FAMILIES", "STYLES", "PREFERRED_STYLE", "STYLE_WEIGHTS", "RULE_JUDGES", "DEFAULT_RULE_JUDGE", "Task",
    "is_curt", "respectful_score",
    "make_tasks", "make_prompts", "make_sft_examples", "respond", "parse_task", "is_correct",
    "detect_style", "judge_score", "judge_description", "evaluate", "is_heldout",
]
