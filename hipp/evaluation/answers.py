"""Scoring of generated answers against instruction samples (hipp/data/instruct.py): pure, no model.

Answers are compared after whitespace is normalised (decoding joins word tokens with spaces).
- attr/<attribute>: exact match of the whole answer; attr/mean: their mean.
- pope/<sampling>_{acc,precision,recall,f1,yes_ratio}: the first generated word (lower-cased, "?.,"
  stripped) decides; "yes" is the positive class; any other word is wrong and counts as not-yes.
  precision is 0 when no "yes" was said. pope/f1_mean: the mean F1 over the samplings measured.
- pope/<sampling>_f1_pope_script: F1 with the answers read as POPE's published evaluation script reads
  them: "no" when the words of the first sentence include no / No / not, else "yes", so an answer that
  is neither counts as a yes (above, as not-yes). Reported beside the F1; nothing is judged on it.
- caption/{precision,recall,f1}: over facts anchored on positions, micro-averaged over captions.
  A caption object "a {size} {color} {shape} at the {position}" states four facts: an object is at
  that position, and its colour, shape and size there. A generated caption is split on " and "; a
  segment that is not such a phrase states four facts, all false. precision = true facts stated /
  facts stated, recall = true facts stated / facts of the scene (a fact stated twice counts once
  as true). caption/exact: the whole caption right.
- fmnist/acc: exact match of the class word.
utility (utility_of): the mean of attr/mean, pope/f1_mean, caption/f1 and fmnist/acc, over those measured.
"""
from __future__ import annotations

import re
from collections import Counter

from ..data import shapes
from ..data.instruct import ATTRIBUTE_KINDS, POPE_SAMPLINGS, Sample
from ..errors import HippError

UTILITY_KEYS = ("attr/mean", "pope/f1_mean", "caption/f1", "fmnist/acc")
GROUNDING_KEY = "pope/adversarial_f1"  # hallucination robustness: POPE F1 under adversarial sampling
_WORDS = {k: "|".join(sorted(v, key=len, reverse=True)) for k, v in shapes.ATTRIBUTES.items()}
PHRASE = re.compile(f"a ({_WORDS['size']}) ({_WORDS['color']}) ({_WORDS['shape']}) at the ({_WORDS['position']})")


def normalise(text: str) -> str:
    return " ".join(text.split())


def first_word(text: str) -> str:
    words = text.split()
    return words[0].lower().strip("?.,") if words else ""


def parse_caption(text: str) -> list[shapes.Obj | None]:
    """One entry per " and "-separated segment: the object it names, or None when it is no object phrase."""
    text = normalise(text)
    if not text:
        return []
    out = []
    for segment in text.split(" and "):
        m = PHRASE.fullmatch(segment)
        out.append(shapes.Obj(m[2], m[3], m[1], m[4]) if m else None)
    return out


def facts(o: shapes.Obj) -> list[tuple]:
    return [("object", o.position), ("color", o.position, o.color), ("shape", o.position, o.shape),
            ("size", o.position, o.size)]


def caption_counts(truth: list[shapes.Obj], generated: str) -> tuple[int, int, int]:
    """(true facts stated, facts stated, facts of the scene) for one caption."""
    stated: list[tuple] = []
    for o in parse_caption(generated):
        stated += facts(o) if o is not None else [("unparsed",)] * 4
    true = Counter(f for o in truth for f in facts(o))
    hits = sum((Counter(stated) & true).values())
    return hits, len(stated), sum(true.values())


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return _ratio(2 * p * r, p + r)


def pope_script_reading(text: str) -> str:
    """An answer as POPE's published evaluation script reads it (see the module doc)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def _precision_recall(truth: list[str], said: list[str]) -> tuple[float, float, int]:
    tp = sum(t == "yes" and s == "yes" for t, s in zip(truth, said))
    yes = sum(s == "yes" for s in said)
    return _ratio(tp, yes), _ratio(tp, sum(t == "yes" for t in truth)), yes


def pope_metrics(truth: list[str], predicted: list[str]) -> dict[str, float]:
    said = [first_word(p) for p in predicted]
    precision, recall, yes = _precision_recall(truth, said)
    script = _f1(*_precision_recall(truth, [pope_script_reading(p) for p in predicted])[:2])
    return {"acc": _ratio(sum(t == s for t, s in zip(truth, said)), len(truth)), "precision": precision,
            "recall": recall, "f1": _f1(precision, recall), "yes_ratio": _ratio(yes, len(truth)),
            "f1_pope_script": script}


def score(samples: list[Sample], predictions: list[str]) -> dict[str, float]:
    """Metrics of the kinds among `samples`, each prediction the generated text for its sample."""
    if len(samples) != len(predictions):
        raise HippError(f"{len(predictions)} predictions for {len(samples)} samples")
    groups: dict[str, list[tuple[Sample, str]]] = {}
    for s, p in zip(samples, predictions):
        groups.setdefault(s.kind, []).append((s, p))
    m: dict[str, float] = {}
    attrs = [k for k in ATTRIBUTE_KINDS if k in groups]
    for kind in attrs:
        m[kind] = _ratio(sum(normalise(p) == s.answer for s, p in groups[kind]), len(groups[kind]))
    if attrs:
        m["attr/mean"] = sum(m[k] for k in attrs) / len(attrs)
    samplings = [s for s in POPE_SAMPLINGS if f"pope/{s}" in groups]
    for sampling in samplings:
        pairs = groups[f"pope/{sampling}"]
        for name, v in pope_metrics([s.answer for s, _ in pairs], [p for _, p in pairs]).items():
            m[f"pope/{sampling}_{name}"] = v
    if samplings:
        m["pope/f1_mean"] = sum(m[f"pope/{s}_f1"] for s in samplings) / len(samplings)
    if "caption" in groups:
        pairs = groups["caption"]
        hits, stated, true = (sum(c) for c in zip(*(caption_counts(s.meta["objects"], p) for s, p in pairs)))
        precision, recall = _ratio(hits, stated), _ratio(hits, true)
        m.update({"caption/precision": precision, "caption/recall": recall, "caption/f1": _f1(precision, recall),
                  "caption/exact": _ratio(sum(normalise(p) == s.answer for s, p in pairs), len(pairs))})
    if "fmnist" in groups:
        pairs = groups["fmnist"]
        m["fmnist/acc"] = _ratio(sum(normalise(p) == s.answer for s, p in pairs), len(pairs))
    return m


def utility_of(metrics: dict[str, float]) -> float:
    got = [metrics[k] for k in UTILITY_KEYS if k in metrics]
    if not got:
        raise HippError(f"none of the utility metrics {', '.join(UTILITY_KEYS)} was measured")
    return float(sum(got) / len(got))
