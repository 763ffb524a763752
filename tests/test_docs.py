"""The pages stay readable at a glance: short sentences on average, and no list item that is a page of its own.

The prose of README.md and of every topic page (docs/*.md; not docs/results/, which code writes) is split into
sentences. Code blocks, tables, headings, image lines, link-only lines and HTML comments are not prose; neither
are the benchmark records that code appends to docs/benchmarks.md below its marker line.
Run `python tests/test_docs.py` to print the measurements of every page."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MEAN_WORDS = 25  # per sentence, averaged over a page
MAX_ITEM_WORDS = 80  # per list item
RECORDS_MARKER = "<!-- new results go below this line"  # docs/benchmarks.md: code appends records below it

# Abbreviations whose full stop ends no sentence (matched case-insensitively, before a space).
ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "et al.", "etc.", "cf.", "approx.", "resp.", "fig.", "figs.", "no.", "eq.")


# Pages another change rewrites: measured and reported, expected to fail until then (drop the entry once it passes).
NOT_YET = {}


def pages():
    docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return ["README.md"] + docs


def checked_pages():
    return [pytest.param(p, marks=pytest.mark.xfail(reason=NOT_YET[p], strict=False)) if p in NOT_YET else p
            for p in pages()]


def prose_units(text):
    """The page's prose as units that end a sentence at their end: one per paragraph or list item.
    Returns (kind, text) pairs, kind "item" for a list item and "para" for a paragraph."""
    if RECORDS_MARKER in text:
        text = text.split(RECORDS_MARKER)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    units, current, kind, fenced = [], [], None, False

    def flush():
        nonlocal current, kind
        if current:
            units.append((kind, " ".join(current)))
        current, kind = [], None

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        link_only = re.fullmatch(r"[(\[]*\[[^\]]*\]\([^)]*\)[).,:;]*", stripped)
        if (not stripped or stripped.startswith("#") or stripped.startswith("|") or stripped.startswith("![")
                or (link_only and not current)):
            flush()  # a blank line, heading, table row, image or link-only line ends the unit before it
            continue  # (a link alone on a line that continues a sentence is part of that sentence)
        item = re.match(r"(?:[-*+]|\d+[.)])\s+(.*)", stripped)
        if item:
            flush()
            kind, current = "item", [item.group(1)]
        else:
            if kind is None:
                kind = "para"
            current.append(stripped)
    flush()
    return units


def clean(text):
    """Text with links as their text, emphasis marks removed and abbreviations without their full stops;
    a code span counts as the words it holds, and no sentence ends inside it."""
    text = re.sub(r"`[^`]*`", lambda m: re.sub(r"[.!?]", "·", m.group(0)), text)  # no sentence ends in code
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("**", "").replace("__", "")
    for abbreviation in ABBREVIATIONS:
        # a whole word only: "config." ends a sentence although it ends like "fig."
        text = re.sub(r"(?<![A-Za-z])" + re.escape(abbreviation) + r"(?=\s)", abbreviation.replace(".", ""), text,
                      flags=re.I)
    return text


def sentences(unit):
    """A unit split at . ! ? followed by white space and an upper-case letter or a code span (closing brackets, quotes and
    emphasis may sit between them); a unit's end ends its last sentence. Decimal numbers never split."""
    parts = re.split(r"(?<=[.!?])[\"')\]*_]*\s+(?=[\"'(\[*_]*(?:[A-Z]|`))", clean(unit))
    return [p for p in parts if words(p)]


def words(text):
    return [w for w in text.split() if re.search(r"[A-Za-z0-9]", w)]


def measure(page):
    """{sentences, words, mean, longest item (words, its first words)} of one page."""
    text = open(os.path.join(ROOT, page)).read()
    count = total = 0
    longest = (0, "")
    for kind, unit in prose_units(text):
        parts = sentences(unit)
        count += len(parts)
        total += sum(len(words(p)) for p in parts)
        if kind == "item":
            n = len(words(clean(unit)))
            if n > longest[0]:
                longest = (n, " ".join(words(clean(unit))[:8]))
    return dict(sentences=count, words=total, mean=total / max(count, 1), longest_item=longest)


def test_the_splitter_reads_sentences_as_a_reader_does():
    unit = ("LayerNorm costs 2.03x at t = 0, e.g. in seed 0 (i.e. the probe). It holds vs. RMSNorm! "
            "Does it? **Yes.** `make toy` shows it; Chen et al. 2025 agree")
    assert [len(words(s)) for s in sentences(unit)] == [13, 4, 2, 1, 9]
    assert [len(words(s)) for s in sentences("It reads the config. See fig. 3 for it")] == [4, 5]
    text = ("# Title\n\nOne two.\nThree four.\n\n```bash\nmake toy. Not prose.\n```\n| a. B |\n- Item one. Item two\n"
            "  goes on.\n\n[a link](x.md)\n\nSee\n[this](y.md).\n")
    assert prose_units(text) == [("para", "One two. Three four."), ("item", "Item one. Item two goes on."),
                                 ("para", "See [this](y.md).")]


@pytest.mark.parametrize("page", checked_pages())
def test_sentences_are_short_on_average(page):
    m = measure(page)
    assert m["mean"] <= MAX_MEAN_WORDS, f"{page}: {m['mean']:.1f} words per sentence (at most {MAX_MEAN_WORDS})"


@pytest.mark.parametrize("page", pages())
def test_no_list_item_is_a_page_of_its_own(page):
    n, start = measure(page)["longest_item"]
    assert n <= MAX_ITEM_WORDS, f"{page}: a list item of {n} words (at most {MAX_ITEM_WORDS}): {start} ..."


def longest_sentences(page, n=5):
    text = open(os.path.join(ROOT, page)).read()
    found = [s for _, unit in prose_units(text) for s in sentences(unit)]
    return sorted(found, key=lambda s: -len(words(s)))[:n]


if __name__ == "__main__":
    import sys
    if sys.argv[1:]:
        for page in sys.argv[1:]:
            for s in longest_sentences(page, 8):
                print(len(words(s)), s, "\n")
        raise SystemExit
    print(f"{'page':<24} {'sentences':>9} {'words':>6} {'mean':>5} {'longest item':>12}")
    for page in pages():
        m = measure(page)
        print(f"{page:<24} {m['sentences']:>9} {m['words']:>6} {m['mean']:>5.1f} {m['longest_item'][0]:>12}")
