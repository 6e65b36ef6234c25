"""Evaluation tasks: a JSONL file, MileBench's layout, or a generated suite (`ruler_tasks` for the
RULER-style families, `builtin_suite` here for the original planted facts).

A task is one context (segments) and one or more questions about it. JSONL, one task a line:
  {"id", "kind", "segments": [{"type": "text", "text", "modality"}, {"type": "image", "path"}],
   "questions": [{"question", "answers": [...], "metric", "choices", "answer_prefix", "max_tokens"}, ...]}
or, for a single question, its fields at the top level ({"segments", "question", "answers", ...}).
metric: "contains" | "all" | "exact" | "rouge_l" | "choice" (default contains); answer_prefix starts
the assistant's reply (RULER's answer prefixes); max_tokens caps the answer (default 32); an answer
holding one of "distractors" (values not asked for) scores 0.
Unknown fields are ignored; a malformed line is reported with its line number and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from ..bindings.prompt import PromptError, Segment, jsonl_lines, parse_segments
from .scoring import METRICS, score


DEFAULT_MAX_TOKENS = 32
MAX_TOKENS_LIMIT = 512


@dataclasses.dataclass
class Question:
    text: str
    answers: list[str]
    metric: str = "contains"
    choices: list[str] = dataclasses.field(default_factory=list)
    answer_prefix: str = ""   # the start of the assistant's reply, decoded with the question
    max_tokens: int = DEFAULT_MAX_TOKENS
    distractors: list[str] = dataclasses.field(default_factory=list)  # an answer holding one scores 0

    def score(self, answer: str) -> float:
        return score(self.metric, answer, self.answers, self.choices, self.distractors)


@dataclasses.dataclass
class Task:
    id: str
    segments: list[Segment]
    questions: list[Question]
    kind: str = ""  # the family, for per-family summaries


def parse_question(obj, where: str) -> Question:
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: a question must be a JSON object")
    question, answers = obj.get("question"), obj.get("answers")
    if not isinstance(question, str):
        raise PromptError(f"{where}: 'question' must be a string")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise PromptError(f"{where}: 'answers' must be a non-empty list of strings")
    metric = obj.get("metric", "contains")
    if metric not in METRICS:
        raise PromptError(f"{where}: metric {metric!r} is not one of {', '.join(METRICS)}")
    choices = obj.get("choices", [])
    if metric == "choice" and (not isinstance(choices, list) or len(choices) < 2):
        raise PromptError(f"{where}: metric 'choice' needs a list of at least two 'choices'")
    prefix = obj.get("answer_prefix", "")
    if not isinstance(prefix, str):
        raise PromptError(f"{where}: 'answer_prefix' must be a string")
    max_tokens = obj.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise PromptError(f"{where}: 'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}")
    distractors = obj.get("distractors", [])
    if not isinstance(distractors, list) or not all(isinstance(d, str) for d in distractors):
        raise PromptError(f"{where}: 'distractors' must be a list of strings")
    return Question(question, answers, metric, [str(c) for c in choices], prefix, max_tokens, distractors)


def parse_task(obj, where: str, base_dir: Path | None = None) -> Task:
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: a task must be a JSON object")
    segments = parse_segments(obj.get("segments"), where, base_dir)
    if "questions" in obj:
        items = obj["questions"]
        if not isinstance(items, list) or not items:
            raise PromptError(f"{where}: 'questions' must be a non-empty list")
        questions = [parse_question(q, f"{where}: question {k}") for k, q in enumerate(items)]
    else:
        questions = [parse_question(obj, where)]
    return Task(str(obj.get("id", where)), segments, questions, str(obj.get("kind", "")))


def load_tasks(path: str | Path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> list[Task]:
    p = Path(path)
    tasks = []
    for where, obj in jsonl_lines(p, "task"):
        if isinstance(obj, ValueError):
            warn(f"{where}: not valid JSON ({getattr(obj, 'msg', obj)}); skipped")
            continue
        try:
            tasks.append(parse_task(obj, where, p.parent))
        except PromptError as e:
            warn(f"{e}; skipped")
    return tasks


def load_milebench(root: str | Path, limit: int | None = None) -> list[Task]:
    """MileBench's layout: DATA/<Task>/<Task>.json with {"data": [{"sample_id", "task_instance":
    {"context": "... {image#1} ...", "images_path": [...], "choice_list": [...]}, "response"}]}
    and images under DATA/<Task>/images/. Multiple-choice samples are scored by choice, the rest
    by ROUGE-L (MileBench's own rules)."""
    root = Path(root)
    files = sorted(root.glob("*/*.json"))
    if not files:
        raise PromptError(f"{root}: no MileBench task files (<Task>/<Task>.json) found")
    tasks = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise PromptError(f"{f}: cannot read the MileBench file ({e})") from None
        for k, sample in enumerate(data.get("data", [])):
            inst = sample.get("task_instance", {})
            context, images = inst.get("context", ""), inst.get("images_path", [])
            segments, rest = [], context
            for j, img in enumerate(images, 1):
                before, marker, rest = rest.partition(f"{{image#{j}}}")
                if before:
                    segments.append(Segment("text", text=before))
                segments.append(Segment("image", image=f.parent / "images" / img, modality="image"))
                if not marker:
                    rest = before and ""
            if rest:
                segments.append(Segment("text", text=rest))
            choices = [str(c) for c in inst.get("choice_list", []) or []]
            gold = str(sample.get("response", ""))
            question = "Answer with the option's letter." if choices else "Answer briefly."
            if choices:
                question = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)) + "\n" + question
            tasks.append(Task(f"{f.stem}/{sample.get('sample_id', k)}", segments or [Segment("text", " ")],
                              [Question(question, [gold], "choice" if choices else "rouge_l", choices)], f.stem))
            if limit and len(tasks) >= limit:
                return tasks
    return tasks


_FILL = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
         "A bird sang in the tree.", "The river runs to the sea.", "Clouds drift over the hills."]
_NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emil", "Fatima", "Goran", "Hana"]


def builtin_suite(lengths=(1024, 2048), per_kind: int = 2, seed: int = 0) -> list[Task]:
    """Planted facts in long filler, at roughly `lengths` tokens (about 5 tokens per filler
    sentence), in four families: a fact in a text span, a fact in an "image"-labelled span,
    several facts with one asked for, and a question that needs a text span and an image span."""
    rng = np.random.default_rng(seed)
    tasks = []

    def filler(n_tokens):
        return " ".join(rng.choice(_FILL) for _ in range(max(1, n_tokens // 5)))

    for length in lengths:
        for k in range(per_kind):
            code = lambda: str(rng.integers(10000, 99999))  # noqa: E731
            third = length // 3
            # 1. fact in text; 2. fact in an image span
            for kind, modality in (("fact-in-text", "text"), ("fact-in-image", "image")):
                key = code()
                segs = [Segment("text", filler(third) + "\n"),
                        Segment("text", "Picture: " + filler(third // 2) + f" The secret passkey is {key}. "
                                + filler(third // 2) + "\n", modality=modality),
                        Segment("text", filler(third) + "\n")]
                tasks.append(Task(f"{kind}-{length}-{k}", segs,
                                  [Question("What is the secret passkey? Answer with the number only.", [key])], kind))
            # 3. several facts, one asked for
            names = rng.choice(_NAMES, 4, replace=False)
            keys = [code() for _ in names]
            parts = [Segment("text", filler(length // 5) + f" {n}'s room number is {c}. ",
                             modality="image" if i % 2 else "text") for i, (n, c) in enumerate(zip(names, keys))]
            ask = int(rng.integers(0, 4))
            tasks.append(Task(f"multi-fact-{length}-{k}", parts + [Segment("text", filler(length // 5) + "\n")],
                              [Question(f"What is {names[ask]}'s room number? Answer with the number only.", [keys[ask]])],
                              "multi-fact"))
            # 4. two spans: who (text) and what (image)
            name, colour = rng.choice(_NAMES), rng.choice(["red", "blue", "green", "yellow"])
            key = code()
            segs = [Segment("text", filler(third) + f" {name} owns the {colour} box. " + filler(third // 2) + "\n"),
                    Segment("text", "Picture: " + filler(third // 2) + f" The {colour} box is labelled {key}. "
                            + filler(third // 2) + "\n", modality="image")]
            tasks.append(Task(f"two-span-{length}-{k}", segs,
                              [Question(f"What is the label of the box {name} owns? Answer with the number only.", [key])],
                              "two-span"))
    return tasks
