"""Which differences between the variants the data can resolve: pairwise tests on the primary metric.

    result = compare(entries, baseline, level=0.95, method="seeds")   # Entry: a variant at one setting
    result.rows                                   # every pair of entries, and each entry vs the baseline

Two ways to pair, both on what the evaluations wrote (nothing here recomputes a feature):
- "seeds": every variant drew sample i of seed s from the same noise, so the per-seed values pair by seed:
  a paired t-test over the shared seeds (metrics.paired_t). The default.
- "bootstrap": with evaluate.bootstrap > 0 the evaluate stage resampled every seed's samples with indices
  drawn from (params.seed, seed) alone, so replicate b of one variant and of another resampled the same
  rows: their difference is a paired bootstrap replicate (metrics.paired_difference).
Every pair's two-sided p-value enters one family with Holm's correction at alpha = 1 - level; a pair is
"significant" only if Holm rejects it, else a tie.
compare_pairs tests given pairs alone (the sweep's winner against a hand-set variant at each shared setting).
(report_data.pairwise and vs_handset build the entries from the evaluations; report_markdown writes the sections.)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

from .metrics import Difference, holm, paired_difference, paired_t

BASELINE = "real vs real (baseline)"


@dataclass(frozen=True)
class Entry:
    name: str  # the variant, or BASELINE
    setting: str  # its setting key ("—" for the baseline)
    estimate: float  # the primary metric: mean over seeds
    replicates: Sequence[float] | None  # its bootstrap replicates (mean over seeds of each resample), if any
    per_seed: dict[str, float]  # the primary metric per seed


@dataclass(frozen=True)
class Pair:
    a: Entry
    b: Entry
    diff: Difference  # a - b of the primary metric (lower is better)
    significant: bool  # Holm-rejected at alpha

    def verdict(self) -> str:
        """"tie", or which side is significantly lower."""
        if not self.significant:
            return "tie"
        return f"{(self.a if self.diff.estimate < 0 else self.b).name} lower"


@dataclass(frozen=True)
class Comparison:
    level: float | None  # the intervals' level; alpha = 1 - level
    rows: list[Pair]
    skipped: str | None = None  # why there are no rows, else None
    method: str = "seeds"  # "seeds" (paired t over seeds) or "bootstrap" (paired bootstrap over samples)
    seeds: tuple[str, ...] = ()  # the seeds paired ("seeds")

    @property
    def alpha(self) -> float | None:
        return None if self.level is None else 1 - self.level


def compare(entries: Sequence[Entry], baseline: Entry | None, level: float, method: str = "seeds") -> Comparison:
    """Every pair of entries and each entry against the baseline: paired differences, Holm-corrected.
    "seeds" pairs the seeds every entry has (the baseline's too, where it has them)."""
    pairs = [*combinations(entries, 2), *((e, baseline) for e in entries if baseline is not None)]
    seeds: tuple[str, ...] = ()
    if method == "bootstrap":
        diffs = [paired_difference(a.estimate, a.replicates, b.estimate, b.replicates, level) for a, b in pairs]
    elif method == "seeds":
        seeds = tuple(sorted(set.intersection(*(set(e.per_seed) for e in entries)), key=int))
        diffs = []
        for a, b in pairs:
            common = [s for s in seeds if s in b.per_seed]
            diffs.append(paired_t([a.per_seed[s] for s in common], [b.per_seed[s] for s in common], level))
    else:
        raise ValueError(f"compare: method must be 'seeds' or 'bootstrap', got {method!r}")
    rejected = holm([d.p_value for d in diffs], 1 - level)
    return Comparison(level, [Pair(a, b, d, r) for (a, b), d, r in zip(pairs, diffs, rejected)], None, method, seeds)


def compare_pairs(pairs: Sequence[tuple[Entry, Entry]], level: float) -> Comparison:
    """Given pairs only, each a paired t-test over the seeds its two entries share, Holm-corrected over the
    pairs: one family, so that "no pair is significant" holds at alpha = 1 - level."""
    diffs = []
    for a, b in pairs:
        common = sorted(set(a.per_seed) & set(b.per_seed), key=int)
        diffs.append(paired_t([a.per_seed[s] for s in common], [b.per_seed[s] for s in common], level))
    rejected = holm([d.p_value for d in diffs], 1 - level)
    seeds = tuple(sorted(set().union(*(set(a.per_seed) & set(b.per_seed) for a, b in pairs)), key=int))
    return Comparison(level, [Pair(a, b, d, r) for (a, b), d, r in zip(pairs, diffs, rejected)], None, "seeds", seeds)


__all__ = ["BASELINE", "Comparison", "Entry", "Pair", "compare", "compare_pairs"]
