"""Whether the confidences can be trusted: reliability tables, expected calibration error, and review thresholds.

Each predicted field with a confidence (``inference.confidence``) is an event: right when it equals the gold value
at the same path (after the metrics' normalisation; lists by position). Binned by confidence, the share of right
fields in a bin should match the bin's mean confidence; the expected calibration error (ECE) is the
sample-weighted mean gap. Documents are events too: their confidence against exact match.

A review threshold T flags each field under T, and each document holding one (or with no confidence: an answer
that does not parse). ``review_sweep`` says, for a range of T, the share of documents flagged and how accurate
the unflagged fields and documents are, so a user can pick T for a target accuracy.
"""

from __future__ import annotations

from typing import Any, Sequence

from .metrics import flatten, normalize_value, parse_json

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)


def field_outcomes(pred_text: str, gold: Any, confidence: dict[str, Any] | None, *, casefold: bool = False,
                   whitespace: bool = True, numeric: bool = False, **_: Any) -> list[tuple[float, bool]]:
    """(confidence, right) for each predicted field that has a confidence."""
    if not confidence:
        return []
    if isinstance(gold, str):
        ok, value = parse_json(gold)
        gold = value if ok and isinstance(value, (dict, list)) else gold
    ok, pred = parse_json(pred_text)
    if not ok:
        return []
    norm = {"casefold": casefold, "whitespace": whitespace, "numeric": numeric}
    gold_flat = {k: normalize_value(v, **norm) for k, v in flatten(gold).items()} if not isinstance(gold, str) else {}
    out = []
    for path, value in flatten(pred).items():
        c = confidence["fields"].get(path)
        if c is None:
            continue
        v = normalize_value(value, **norm)
        out.append((float(c), path in gold_flat and gold_flat[path] == v and type(gold_flat[path]) is type(v)))
    return out


def reliability(pairs: Sequence[tuple[float, bool]], bins: int = 10) -> dict[str, Any]:
    """Equal-width confidence bins: count, mean confidence and accuracy of each; ECE over all."""
    rows = []
    n = len(pairs)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, ok) for c, ok in pairs if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if not inside:
            continue
        conf = sum(c for c, _ in inside) / len(inside)
        acc = sum(ok for _, ok in inside) / len(inside)
        ece += len(inside) / n * abs(acc - conf)
        rows.append({"from": lo, "to": hi, "n": len(inside), "confidence": round(conf, 6), "accuracy": round(acc, 6)})
    return {"n": n, "ece": round(ece, 6) if n else None, "bins": rows}


def review_at(docs: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """What a review threshold does on a set of documents, each {"fields": [(c, right)], "confidence", "exact"}."""
    flagged_docs = [d for d in docs if d["confidence"] is None or any(c < threshold for c, _ in d["fields"])]
    kept_docs = [d for d in docs if d not in flagged_docs]
    fields = [f for d in docs for f in d["fields"]]
    kept = [ok for c, ok in fields if c >= threshold]
    flagged = [ok for c, ok in fields if c < threshold]
    return {
        "threshold": threshold,
        "documents_flagged": len(flagged_docs),
        "share_documents_flagged": round(len(flagged_docs) / len(docs), 6) if docs else None,
        "fields_flagged": len(flagged),
        "field_accuracy_unflagged": round(sum(kept) / len(kept), 6) if kept else None,
        "field_accuracy_flagged": round(sum(flagged) / len(flagged), 6) if flagged else None,
        "exact_match_unflagged": round(sum(d["exact"] for d in kept_docs) / len(kept_docs), 6) if kept_docs else None,
    }


def calibration(rows: Sequence[dict[str, Any]], model: str, scores: Sequence[Any], options: dict[str, Any],
                review_below: float = 0.0) -> dict[str, Any] | None:
    """The calibration block of one model's metrics; None when its answers carry no confidences."""
    if not any((row[model].get("confidence") is not None) for row in rows):
        return None
    docs = []
    for row, score in zip(rows, scores):
        conf = row[model].get("confidence")
        docs.append({"fields": field_outcomes(row[model]["raw"], row["gold"], conf, **options),
                     "confidence": conf["document"] if conf else None, "exact": bool(score.exact_match)})
    fields = [f for d in docs for f in d["fields"]]
    out: dict[str, Any] = {
        "fields": reliability(fields),
        "documents": reliability([(d["confidence"], d["exact"]) for d in docs if d["confidence"] is not None]),
        "documents_without_confidence": sum(d["confidence"] is None for d in docs),
        "review_sweep": [review_at(docs, t) for t in THRESHOLDS],
    }
    if review_below:
        out["review"] = review_at(docs, review_below)
    return out
