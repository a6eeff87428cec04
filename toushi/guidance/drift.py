"""Drift guard: guidance refined round after round tends to drift into pseudo-profound jargon
("the emotional wave function collapses on a topological manifold"). Each round's guidance text is
scored with ``toushi.metrics.jargon_score`` (zh+en term list, formulas, long sentences); a round above
the threshold is flagged and not built upon, and the best round is kept.
"""

from __future__ import annotations

from toushi.metrics import jargon_hits, jargon_score


def score(text: str) -> dict:
    """jargon_score plus the terms found (for the drift report)."""
    return {**jargon_score(text), "terms": sorted(set(jargon_hits(text)))}


def best_round(rounds: list[dict], threshold: float) -> int | None:
    """Index of the round to keep among ``rounds`` (each {"score": float, "accepted": bool}): the latest
    accepted round at or under the threshold (later rounds have seen more pairs); when every accepted
    round drifted, the least drifted one (earliest on a tie). None when no round was accepted."""
    accepted = [i for i, r in enumerate(rounds) if r.get("accepted", True)]
    if not accepted:
        return None
    clean = [i for i in accepted if rounds[i]["score"] <= threshold]
    if clean:
        return clean[-1]
    return min(accepted, key=lambda i: (rounds[i]["score"], i))
