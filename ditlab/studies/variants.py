"""The normalization variants the studies compare: their order, how reports name them, and their colours
(one colour per variant in every figure of every study)."""

ORDER = ("layer-norm", "none", "rms-norm", "dyt", "derf", "layer-norm-restore")
LABELS = {"layer-norm": "LayerNorm", "none": "no LayerNorm"}  # the two variants of the toy study, in words
COLORS = {"layer-norm": "tab:red", "none": "tab:blue", "rms-norm": "tab:green", "dyt": "tab:purple",
          "derf": "tab:orange", "layer-norm-restore": "tab:brown"}
TOY_VARIANTS = ("layer-norm", "none")  # `make toy`
ABLATION_VARIANTS = ("layer-norm", "none", "rms-norm", "dyt")  # `make ablation`
DIGITS_VARIANTS = ("layer-norm", "none", "rms-norm", "dyt", "derf")  # `make digits`


def label(variant):
    """How a report names a variant."""
    return LABELS.get(variant, variant)


def color(variant):
    """A variant's colour in every figure (grey for one not in the registry)."""
    return COLORS.get(variant, "0.4")


def order_key(variant):
    """Where a variant goes in tables and legends: registry order, unknown variants last (by name)."""
    return (ORDER.index(variant), "") if variant in ORDER else (len(ORDER), variant)
