"""The one statistics helper of the studies: mean and range over seeds, geometric means, and ratios of two
variants paired by seed. Few seeds, so ranges rather than standard errors are what the reports show."""

import math
import statistics


def spread(values):
    """Mean, range, standard deviation (0 for one value) and count of `values`, and the values themselves."""
    values = list(values)
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0, n=len(values), values=values)


def geomean(values):
    """The geometric mean (errors spread over decades: the arithmetic mean would be the largest one's)."""
    values = list(values)
    return math.exp(statistics.fmean(math.log(v) for v in values))


def paired_ratios(a, b):
    """a[seed] / b[seed] for every seed both dicts hold, in seed order: a ratio of two variants trained from
    the same seed, so that seed-to-seed scatter shared by both cancels."""
    return [a[s] / b[s] for s in sorted(set(a) & set(b))]


def ratio_spread(a, b):
    """The ratio of the means of two {seed: value} dicts with the range of the per-seed ratios."""
    paired = paired_ratios(a, b)
    return dict(ratio=statistics.fmean(a.values()) / statistics.fmean(b.values()),
                ratio_min=min(paired), ratio_max=max(paired), per_seed_ratios=paired)


def fmt_spread(values, digits=3):
    """"mean [min, max]" of `values` (or of a spread dict), for a markdown cell."""
    s = values if isinstance(values, dict) else spread(values)
    return f"{s['mean']:.{digits}g} [{s['min']:.{digits}g}, {s['max']:.{digits}g}]"
