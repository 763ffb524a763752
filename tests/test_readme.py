"""The README cannot rot: every command it shows names a script, module or make target that exists, and
every flag it passes is one that command's --help lists (so a renamed or removed flag fails here)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """The command lines of the README's code blocks: (kind, target, argv) for `python SCRIPT ...`,
    `python -m MODULE ...`, `torchrun ... SCRIPT ...` and `make TARGET ...`."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=value prefixes
            if not words:
                continue
            if words[0] in ("python", "python3"):
                if words[1:2] == ["study.py"] and len(words) > 2 and not words[2].startswith("-"):
                    commands.append(("study", words[2], words[3:]))
                elif words[1:2] == ["-m"]:
                    commands.append(("module", words[2], words[3:]))
                elif len(words) > 1 and words[1].endswith(".py"):
                    commands.append(("script", words[1], words[2:]))
            elif words[0] == "torchrun":
                script = next((w for w in words[1:] if w.endswith(".py")), None)
                if script:
                    commands.append(("script", script, words[words.index(script) + 1:]))
            elif words[0] == "make":
                commands.append(("make", words[1] if len(words) > 1 else "", []))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_commands():
    targets = {target for kind, target, _ in COMMANDS}
    assert {"toy", "test"} <= targets and "train.py" in targets and "sample.py" in targets


# Every command's --help, collected in one subprocess (one torch import instead of one per command).
_COLLECT = """
import contextlib, io, json, runpy, sys
out = {}
for kind, target in json.loads(sys.argv[1]):
    sys.argv = ["study.py", target, "--help"] if kind == "study" else [target, "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            if kind == "study":
                runpy.run_path("study.py", run_name="__main__")
            elif kind == "script":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = "no exit"
    except SystemExit as e:
        code = e.code
    out[kind + ":" + target] = [code, buf.getvalue()]
print(json.dumps(out))
"""
_HELP = {}


def help_text(kind, target):
    if not _HELP:
        wanted = sorted({(k, t) for k, t, _ in COMMANDS if k != "make"} | {("study", new) for _, new in moved()})
        out = subprocess.run([sys.executable, "-c", _COLLECT, json.dumps(wanted)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        _HELP.update(json.loads(out.stdout.strip().splitlines()[-1]))
    code, text = _HELP[f"{kind}:{target}"]
    assert code in (0, None), f"{target} --help exited with {code}"
    return text


@pytest.mark.parametrize("kind,target,argv", [c for c in COMMANDS if c[0] != "make"],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_readme_command_flags_exist(kind, target, argv):
    if kind == "script":
        assert os.path.isfile(os.path.join(ROOT, target)), f"the README runs {target}, which does not exist"
    text = help_text(kind, target)
    for flag in [a.split("=")[0] for a in argv if a.startswith("--")]:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{target} has no flag {flag}"


def moved():
    """(old script, study name) of docs/studies.md's table of the commands that moved."""
    text = open(os.path.join(ROOT, "docs", "studies.md")).read()
    return re.findall(r"^\| `python (\w+\.py) \.\.\.` \| `python study\.py (\w+) \.\.\.` \|$", text, flags=re.M)


def test_every_old_study_script_has_a_documented_replacement_that_runs():
    """The five study scripts that became `python study.py NAME`: each is named in docs/studies.md's table,
    is gone from the root, and its replacement answers --help with the old script's main flags."""
    table = dict(moved())
    assert set(table) == {"toy_study.py", "sweep.py", "ablation.py", "digits_study.py", "mechanism.py"}
    kept_flags = {"toy": ["--seeds", "--report", "--no-outliers"], "sweep": ["--cells", "--steps-scale", "--report"],
                  "ablation": ["--variants", "--seeds"], "digits": ["--lengths", "--report", "--record", "--records"],
                  "mechanism": ["--cells", "--long-steps", "--report", "--record"]}
    for old, new in table.items():
        assert not os.path.exists(os.path.join(ROOT, old)), f"{old} is back at the root"
        text = help_text("study", new)
        for flag in kept_flags[new] + ["--parallel", "--out"]:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"study.py {new} has no flag {flag}"


def test_readme_make_targets_exist():
    for kind, target, _ in COMMANDS:
        if kind == "make":
            out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"make {target}: {out.stderr}"


def tracked_files():
    """The files git tracks (what a fresh clone has), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def test_every_relative_link_of_the_docs_points_to_a_tracked_file():
    """A link to a page or figure that exists only on the machine that wrote it (an ignored path, a file never
    committed) is broken for everyone else."""
    tracked = tracked_files()
    pages = ["README.md"] + sorted(os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "docs"))
                                   for f in fs if f.endswith(".md"))
    broken = []
    for page in pages:
        text = open(os.path.join(ROOT, page)).read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        text = re.sub(r"`[^`]*`", "", text)  # code, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            exists = path in tracked or any(f.startswith(path + "/") for f in tracked) if tracked else \
                os.path.exists(os.path.join(ROOT, path))
            if not exists:
                broken.append(f"{page}: {target}")
    assert not broken, "links to files a fresh clone does not have: " + ", ".join(broken)


def test_the_digits_table_quotes_the_results_page():
    """The digits table of docs/digits.md is quoted from docs/results/digits_32k.md (written by the study's
    report), never retyped: every figure of a row is in a row of the page for the same variant, and the
    page's lr is the one the table names. Catches a topic page left behind when the page is regenerated."""
    readme = open(os.path.join(ROOT, "docs", "digits.md")).read()
    page = open(os.path.join(ROOT, "docs", "results", "digits_32k.md")).read().splitlines()
    rows = re.findall(r"^\| (layer-norm|none|rms-norm|dyt|derf) \((\S+)\) \|(.*)\|$", readme, flags=re.M)
    assert len(rows) == 5, "docs/digits.md's digits table should have a row per variant"
    for variant, lr, cells in rows:
        mine = [line for line in page if line.startswith(f"| {variant} |")]
        assert any(f"| {float(lr):g} |" in line for line in mine), (variant, lr)
        for cell in (c.strip() for c in cells.split("|")):
            assert any(f"| {cell} |" in line for line in mine), f"{variant}: {cell} is not on the results page"


def results_text():
    """Every results page (docs/results/*.md), the pages that code writes, as one text."""
    folder = os.path.join(ROOT, "docs", "results")
    return "\n".join(open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)) if f.endswith(".md"))


NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?"


def test_every_spread_the_readme_quotes_is_on_a_results_page():
    """Every "mean [min, max]" of the README is quoted from a results page, never retyped or rounded again."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    pages = results_text()
    quoted = re.findall(rf"(?<![\w.]){NUMBER} \[{NUMBER}, {NUMBER}\]", readme)
    assert len(quoted) > 20, "the README should show its evidence with spreads"
    missing = [q for q in quoted if q not in pages]
    assert not missing, "not on any docs/results page: " + ", ".join(missing)


def test_every_decimal_of_the_findings_table_is_on_a_results_page():
    """The findings table at the top of the README (finding, evidence, command, page): every number with a
    decimal point in it appears on a results page, so a rounding or a typo fails here."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = re.search(r"^\| finding \| evidence.*?(?=\n\n)", readme, flags=re.M | re.S)
    assert table, "the README opens with a findings table"
    numbers = set(re.findall(r"`[^`]*`|(?<![\w.])(-?\d+\.\d+)(?![\w.]*\.\w)", table.group(0))) - {""}
    on_pages = set(re.findall(r"(?<![\w.])-?\d+\.\d+", results_text()))
    on_pages |= {n.lstrip("-") for n in on_pages} | {"-" + n for n in on_pages}
    assert numbers and not numbers - on_pages, "not on any docs/results page: " + ", ".join(sorted(numbers - on_pages))


def test_the_layout_lists_every_module_and_root_file():
    """The README's Layout section has a row for every root .py file and every ditlab module."""
    text = open(os.path.join(ROOT, "README.md")).read()
    layout = text[text.index("## Layout"):]
    rows = set(re.findall(r"^\| `([\w/.]+)` \|", layout, flags=re.M))
    wanted = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    for folder, _, files in os.walk(os.path.join(ROOT, "ditlab")):
        wanted |= {os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/") for f in files
                   if f.endswith(".py") and f != "__init__.py"}
    assert wanted - rows == set(), f"not in the README's layout: {sorted(wanted - rows)}"
    assert rows - wanted - {"diffusion/"} == set(), f"the layout lists what does not exist: {sorted(rows - wanted)}"
    assert len([f for f in os.listdir(ROOT) if f.endswith(".py")]) <= 12  # one front door


def readme_times():
    """Every duration the README promises: (command, minutes), from a code line's comment ("about 6 minutes",
    "~2.5 min") or a table cell ("`make sweep` (about 80 minutes)"). Budgets ("under 9.5 minutes") and
    "hours" are not promises of a measured time."""
    times = []
    for line in open(os.path.join(ROOT, "README.md")).read().splitlines():
        got = re.search(r"(?<!under )(?:about |~)(\d+(?:\.\d+)?) min", line)
        if not got:
            continue
        if line.startswith("|"):
            command = re.search(r"`([^`]+)` \((?:about |~)\d", line).group(1)
        else:
            command = line.split("#")[0].strip()
        times.append((command, float(got.group(1))))
    return times


def test_every_time_the_readme_states_is_measured_in_the_benchmarks_page():
    """Each README time has a row in docs/benchmarks.md's table of measured times, and the README's figure is
    within 30% of the measurement (a stale "~4 min" for a 2.4-minute job fails here)."""
    page = open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    section = page[page.index("## The times the README states"):]
    table = section[section.index("| README command"):]
    measured = {}
    for row in table[:table.index("\n\n")].splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        command = re.match(r"`([^`]+)`", cells[0]).group(1)
        minutes = re.search(r"\((\d+(?:\.\d+)?) min\)", cells[1]) or re.search(r"(\d+(?:\.\d+)?) min", cells[1])
        measured[command] = float(minutes.group(1))
    times = readme_times()
    assert len(times) >= 5, times
    for command, minutes in times:
        assert command in measured, f"the README's time for `{command}` has no row in docs/benchmarks.md"
        assert abs(minutes - measured[command]) <= 0.3 * measured[command], \
            f"the README says {minutes} min for `{command}`; docs/benchmarks.md measured {measured[command]} min"
