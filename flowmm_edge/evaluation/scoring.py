"""Task metrics: contains, all (the share of the golds the answer contains: RULER's
string_match_all, for answers that list several values), exact, ROUGE-L (F1 of the longest common subsequence of the
normalised whitespace tokens; rouge-score's own tokenizer and optional stemming differ)
and choice (the option a free-form answer picks: a letter like "B", "(B)", "B." or the option text).
`context_interval` is the 95% interval of a mean score, by bootstrap over the contexts;
`paired_interval` that of the difference of two runs' mean scores on the same contexts."""

from __future__ import annotations

import re
import string

import numpy as np

METRICS = ("contains", "all", "exact", "rouge_l", "choice")
BOOTSTRAP = 2000  # resamples for context_interval
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, punctuation removed, articles dropped, whitespace collapsed (SQuAD's rule)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains(answer: str, golds: list[str]) -> float:
    a = normalize(answer)
    return float(any(normalize(g) and normalize(g) in a for g in golds))


def contains_all(answer: str, golds: list[str]) -> float:
    a = normalize(answer)
    return sum(bool(normalize(g)) and normalize(g) in a for g in golds) / len(golds)


def exact(answer: str, golds: list[str]) -> float:
    return float(any(normalize(answer) == normalize(g) for g in golds))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(answer: str, golds: list[str]) -> float:
    best = 0.0
    a = normalize(answer).split()
    for g in golds:
        b = normalize(g).split()
        lcs = _lcs(a, b)
        if lcs:
            p, r = lcs / len(a), lcs / len(b)
            best = max(best, 2 * p * r / (p + r))
    return best


def picked_choice(answer: str, choices: list[str]) -> int | None:
    """Index of the option the answer picks, or None."""
    letters = string.ascii_uppercase[: len(choices)]
    m = re.match(r"\s*\(?([A-Z])[\).:\s]|\s*\(?([A-Z])\)?\s*$", answer)
    if m and (m.group(1) or m.group(2)) in letters:
        return letters.index(m.group(1) or m.group(2))
    a = normalize(answer)
    hits = [i for i, c in enumerate(choices) if normalize(c) and normalize(c) in a]
    return hits[0] if len(hits) == 1 else None


def choice(answer: str, golds: list[str], choices: list[str]) -> float:
    """Golds are letters ("B") or option texts."""
    k = picked_choice(answer, choices)
    if k is None:
        return 0.0
    letters = string.ascii_uppercase
    return float(any(g.strip().upper() == letters[k] or normalize(g) == normalize(choices[k]) for g in golds))


def score(metric: str, answer: str, golds: list[str], choices: list[str] | None = None,
          distractors: list[str] | None = None) -> float:
    """The metric's score; 0 if the answer also holds a distractor (a value the question did not
    ask for, such as another key's number: listing every number is not knowing which one)."""
    if distractors and contains(answer, distractors):
        return 0.0
    if metric == "choice":
        return choice(answer, golds, choices or [])
    return {"contains": contains, "all": contains_all, "exact": exact, "rouge_l": rouge_l}[metric](answer, golds)


def context_interval(scores_by_context: list[list[float]], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The `level` interval of the mean score over all questions, by a percentile bootstrap that
    resamples whole contexts (a context's questions share its cache, so they are not independent)."""
    groups = [np.asarray(g, np.float64) for g in scores_by_context if len(g)]
    if not groups:
        return float("nan"), float("nan")
    sums, counts = np.array([g.sum() for g in groups]), np.array([len(g) for g in groups])
    return _bootstrap(len(groups), level, seed, lambda pick: sums[pick].sum(1) / counts[pick].sum(1))


def _bootstrap(n_contexts: int, level: float, seed: int, statistic) -> tuple[float, float]:
    """The `level` percentile interval of statistic(pick), pick [BOOTSTRAP, n_contexts] being the
    contexts each resample draws."""
    pick = np.random.default_rng(seed).integers(0, n_contexts, size=(BOOTSTRAP, n_contexts))
    lo, hi = np.quantile(statistic(pick), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_interval(a_by_context: list[list[float]], b_by_context: list[list[float]], level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """b's mean score over all questions less a's, and its `level` interval, where the i-th entries
    of both are the same context's questions scored two ways (two methods, two code paths, two
    versions): a percentile bootstrap that resamples whole contexts and keeps each pair together."""
    if len(a_by_context) != len(b_by_context):
        raise ValueError(f"paired runs need the same contexts: {len(a_by_context)} against {len(b_by_context)}")
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in zip(a_by_context, b_by_context) if len(a) and len(b)]
    if not pairs:
        return float("nan"), float("nan"), float("nan")
    sa, ca = np.array([a.sum() for a, _ in pairs]), np.array([len(a) for a, _ in pairs])
    sb, cb = np.array([b.sum() for _, b in pairs]), np.array([len(b) for _, b in pairs])
    lo, hi = _bootstrap(len(pairs), level, seed,
                        lambda pick: sb[pick].sum(1) / cb[pick].sum(1) - sa[pick].sum(1) / ca[pick].sum(1))
    return float(sb.sum() / cb.sum() - sa.sum() / ca.sum()), lo, hi
