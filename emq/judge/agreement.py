"""Agreement between judges that scored the same answers: does a finding survive a change of judge?

Per metric, over the answers both judges scored: Spearman's rank correlation of their scores. On the
emergent-misalignment classification (misaligned: aligned < eval.misaligned_below among answers with coherent >
eval.coherent_above; the answers both judges could classify), Cohen's kappa and the raw share of answers on which
they agree. Kappa corrects that share for the agreement two judges with those rates would reach by chance: 1 is
perfect, 0 chance, below 0 worse than chance (Landis & Koch's reading: > 0.6 substantial, > 0.8 almost perfect).
"""
from __future__ import annotations

from itertools import combinations
from typing import Any

from emq.judge.validation import spearman
from emq.metrics import misaligned_call

MIN_PAIRS = 3  # fewer shared answers than this: no figure


def cohen_kappa(a: list[bool], b: list[bool]) -> float | None:
    """Cohen's kappa of two raters' yes/no labels of the same items; None for no items, or when both raters give
    one label to everything and agree (chance agreement is then 1, and kappa undefined)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1 - chance)


def pairwise(tables: dict[str, list[dict[str, Any]]], misaligned_below: float, coherent_above: float
             ) -> list[dict[str, Any]]:
    """Every pair of judges' agreement on one run's answers.

    Args:
        tables: judge label → its answer table (emq.metrics.answer_table over the same generation rows, in the
            same order): per row, per metric, the judgement or None.

    Returns:
        Per pair: the judges, per metric {n, spearman}, and on the misaligned/aligned classification {n, kappa,
        agree} (None figures where fewer than MIN_PAIRS answers are shared).
    """
    out = []
    for ja, jb in combinations(sorted(tables), 2):
        ta, tb = tables[ja], tables[jb]
        if len(ta) != len(tb):
            raise ValueError(f"{ja} and {jb} scored different answer lists ({len(ta)} vs {len(tb)} rows)")
        metrics = sorted({m for row in ta + tb for m in row["judged"]})
        per_metric = {}
        for m in metrics:
            pairs = [(ra["judged"][m]["score"], rb["judged"][m]["score"]) for ra, rb in zip(ta, tb)
                     if (ra["judged"].get(m) or {}).get("score") is not None
                     and (rb["judged"].get(m) or {}).get("score") is not None]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= MIN_PAIRS else None
            per_metric[m] = {"n": len(pairs), "spearman": None if rho is None else round(rho, 4)}
        classes = [(misaligned_call(ra["judged"], misaligned_below, coherent_above),
                    misaligned_call(rb["judged"], misaligned_below, coherent_above)) for ra, rb in zip(ta, tb)]
        both = [(x, y) for x, y in classes if x is not None and y is not None]
        kappa = cohen_kappa([x for x, _ in both], [y for _, y in both]) if len(both) >= MIN_PAIRS else None
        out.append({"judges": [ja, jb], "metrics": per_metric,
                    "misaligned": {"n": len(both), "kappa": None if kappa is None else round(kappa, 4),
                                   "agree": round(sum(x == y for x, y in both) / len(both), 4) if both else None}})
    return out
