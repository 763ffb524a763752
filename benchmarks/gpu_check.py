"""`make gpu-check`: one command that proves the GPU path and measures it against the targets.

Made for short GPU windows (under 10 minutes, no internet). Each part runs as its own process with its own
time limit, so a part that crashes or hangs costs only its budget and the others still report:

  tests     the GPU-only tests (pytest -m gpu: bf16 + compile + grad checkpointing in train.py, the
            benchmark on CUDA, no host syncs in a training step)
  train     train.py in bf16 + compile (the digits demo data): a checkpoint, a sample grid, then --resume
            to a later step
  xl-train  one DiT-XL/2 training step (256 px = 32x32 latents, batch 32), bf16 and bf16+compile, ours
            against diffusers' DiTTransformer2DModel (benchmarks/bench.py): images/s, peak memory, MFU
            against the measured bf16 matmul peak
  xl-sample 250-step DDPM sampling of DiT-XL/2 with classifier-free guidance (images/s, MFU)
  toy       the toy study's paper preset (DiT-XS/1, batch 2048, fp32: the study's precision), both
            variants, eager, compiled, and compiled with CUDA graphs (reduce-overhead), and the 50k-step
            wall time extrapolated from steps/s

It prints a verdict per check (pass / fail / figure) and writes one dated section to docs/benchmarks.md.
Without a GPU it runs the same parts with tiny shapes on the CPU (about a minute), says that no GPU was
found, records nothing unless --record is given, and exits 0 unless a part broke: a dry run that keeps
the check from rotting.

    python -m benchmarks.gpu_check                       # = make gpu-check
    python3 -m benchmarks.gpu_check --wheels .whl        # on a machine without diffusers: install carried wheels
    python -m benchmarks.gpu_check --only toy xl-sample  # some parts only

The exit code is 1 when a part failed to run (crash, timeout, missing output); missing a speed target is
reported as `fail` in the verdicts but is a measurement, not a breakage, and leaves the exit code 0.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from benchmarks.deadline import run_jobs
from benchmarks.records import device_name, git_commit, record, versions
from ditlab.files import read_log

PARTS = ("tests", "train", "xl-train", "xl-sample", "toy")

# Targets of the GPU check (docs/benchmarks.md explains them). MFU counts 2 FLOPs per multiply-add.
TARGET_TRAIN_MFU = 0.45  # DiT-XL/2 bf16+compile training step
TARGET_SAMPLE_MFU = 0.45  # DiT-XL/2 250-step guided sampling
TARGET_TOY_MINUTES = 10.0  # the paper preset's steps, both variants together

# The toy part's runs on a GPU: eager, compiled, compiled with CUDA graphs ("reduce-overhead"), each
# with its share of the part's budget (cumulative: a run may use what the earlier ones left).
TOY_SETTINGS = [("eager", 0.25), ("default", 0.6), ("reduce-overhead", 1.0)]

# Seconds each part may take on a GPU; the whole check stays under 9.5 minutes of wall time.
# Measured on an H100 (docs/benchmarks.md): tests 64 s, train 71 s, xl-train 227 s, xl-sample 55 s, toy 79 s.
# The toy part then gained its CUDA-graph run (about 40 s more, not yet measured).
GPU_BUDGET = {"tests": 100, "train": 120, "xl-train": 260, "xl-sample": 75, "toy": 130}
MIN_PART_SECONDS = 5  # a part that would get less is skipped (reported, and the check exits 1)
CPU_BUDGET = {"tests": 120, "train": 120, "xl-train": 120, "xl-sample": 60, "toy": 60}


#################################################################################
#                                  Environment                                  #
#################################################################################


def install_wheels(wheel_dir, env):
    """If diffusers is missing and `wheel_dir` holds wheels (carried to a machine without internet),
    install them into a temporary folder on the child processes' PYTHONPATH. Returns a message."""
    probe = subprocess.run([sys.executable, "-c", "import diffusers"], capture_output=True, env=env)
    if probe.returncode == 0:
        return None
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))) if wheel_dir else []
    if not wheels:
        return (f"diffusers is not installed and no wheels were found in {wheel_dir!r}: the peer is skipped "
                "(see docs/benchmarks.md for carrying wheels)")
    target = tempfile.mkdtemp(prefix="gpu-check-site-")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--target", target, *wheels], capture_output=True, text=True)
    if out.returncode:
        return f"installing the wheels in {wheel_dir} failed (the peer is skipped): {out.stderr.strip()[-300:]}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [target, env.get("PYTHONPATH")]))
    return f"installed {len(wheels)} carried wheels from {wheel_dir} for this check"


def run_part(name, cmd, budget, log_dir, env):
    """Run one command through the job runner with a time limit, its output teed to the console and
    <log_dir>/<name>.log. Returns (exit code or 'timeout', seconds, output)."""
    if budget < MIN_PART_SECONDS:
        print(f"\n=== {name}: skipped, {budget:.0f} s left of the check's time limit", flush=True)
        return "skipped", 0.0, ""
    print(f"\n=== {name}: {shlex.join(cmd)}  (limit {budget:.0f} s)", flush=True)
    log = os.path.join(log_dir, f"{name}.log")
    start, before = time.perf_counter(), len(read_log(log))
    (rc,) = run_jobs([cmd], 1, log_dir, tags=[name], env=env, names=[name], append=True, timeout=budget, check=False)
    seconds = time.perf_counter() - start
    print(f"=== {name}: {'timed out' if rc == 'timeout' else f'exit {rc}'} after {seconds:.0f} s", flush=True)
    return rc, seconds, read_log(log)[before:]


def run_concurrently(name, cmds, budget, log_dir, env):
    """Run `cmds` at the same time through the job runner, each logging to <log_dir>/<name>-<i>.log, under one
    time limit. Returns (0, the first non-zero exit code, or 'timeout'; seconds). Prints each log when done."""
    if budget < MIN_PART_SECONDS:
        print(f"\n=== {name}: skipped, {budget:.0f} s left of the check's time limit", flush=True)
        return "skipped", 0.0
    print(f"\n=== {name}: {len(cmds)} processes at once (limit {budget:.0f} s)", flush=True)
    for i, cmd in enumerate(cmds):
        print(f"  {i}: {shlex.join(cmd)}", flush=True)
    start, names = time.perf_counter(), [f"{name}-{i}" for i in range(len(cmds))]
    codes = run_jobs(cmds, len(cmds), log_dir, env=env, names=names, timeout=budget, check=False)
    rc = next((code for code in codes if code), 0)
    for log in names:
        print("".join("  | " + line for line in read_log(os.path.join(log_dir, f"{log}.log")).splitlines(True)),
              end="", flush=True)
    seconds = time.perf_counter() - start
    print(f"=== {name}: {'timed out' if rc == 'timeout' else f'exit {rc}'} after {seconds:.0f} s", flush=True)
    return rc, seconds


class Budget(dict):
    """Per-part time limits that never run past the whole check's deadline: budget[part] is the part's
    own limit or the time left, whichever is smaller (0 once the deadline has passed)."""

    def __init__(self, limits, deadline):
        super().__init__(limits)
        self.deadline = deadline

    def __getitem__(self, part):
        return max(0.0, min(super().__getitem__(part), self.deadline - time.perf_counter()))


#################################################################################
#                                     Parts                                     #
#################################################################################


def bench_cmd(gpu, json_path, part):
    """benchmarks/bench.py for one part, at full size on a GPU and tiny on a CPU."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--record", "", "--json", json_path]
    if gpu:
        size = ["--model", "DiT-XL/2", "--image-size", "256", "--batch-size", "32"]
        if part == "xl-train":
            return cmd + size + ["--skip", "sample", "toy", "--settings", "bf16", "bf16+compile", "--warmup", "3",
                                 "--rounds", "5", "--steps-per-round", "5"]
        if part == "xl-sample":
            return cmd + size + ["--skip", "train", "toy", "--settings", "bf16", "--no-peer", "--sample-guidance",
                                 "cfg", "--sample-steps", "250", "--sample-rounds", "2"]
        return cmd + ["--skip", "train", "sample", "--settings", "fp32", "--toy-preset", "paper",
                      "--toy-precision", "fp32", "--toy-steps", "100"]
    size = ["--model", "DiT-S/2", "--input-size", "8", "--depth", "2", "--batch-size", "4", "--threads", "2",
            "--device", "cpu", "--no-memory"]
    if part == "xl-train":
        return cmd + size + ["--skip", "sample", "toy", "--settings", "fp32", "--warmup", "1", "--rounds", "2",
                             "--steps-per-round", "1"]
    if part == "xl-sample":
        return cmd + size + ["--skip", "train", "toy", "--settings", "fp32", "--no-peer", "--sample-guidance", "cfg",
                             "--sample-steps", "5", "--sample-rounds", "1"]
    size[size.index("--threads") + 1] = "1"  # two toy processes at once, one thread each (as make toy)
    return cmd + size + ["--skip", "train", "sample", "--settings", "fp32", "--toy-preset", "cpu",
                         "--toy-precision", "fp32", "--toy-steps", "5"]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_tests(gpu, rc, out):
    """Verdict of the GPU-only tests from pytest's summary line."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    if rc != 0 and rc != 5:  # 5: no tests collected
        return "fail", f"pytest exit {rc}: {counts}"
    if not gpu:
        return "figure", f"no GPU: {counts.get('skipped', 0)} GPU tests skipped cleanly"
    return ("pass" if counts.get("passed") and not counts.get("skipped") else "fail"), f"{counts}"


def train_cmds(gpu, work):
    """A short train.py run with a checkpoint and a sample grid, then a resume to a later step."""
    data, results = os.path.join(work, "digits"), os.path.join(work, "runs")
    if gpu:
        speed = ["--precision", "bf16", "--compile", "--device", "cuda"]
        steps, more = 40, 60
    else:
        speed = ["--precision", "fp32", "--device", "cpu"]
        steps, more = 4, 6
    first = [sys.executable, os.path.join(REPO, "train.py"), "--demo", "--data-path", data, "--results-dir", results,
             "--max-steps", str(steps), "--ckpt-every", str(steps), "--sample-every", str(steps),
             "--sample-steps", "20",
             "--sample-images", "16", "--log-every", str(steps // 4), "--num-workers", "1", *speed]
    return first, steps, more, results, speed


def check_train(gpu, results, steps, more, outputs):
    """Verdict of the train.py round trip: checkpoints at both steps, a sample grid, and (GPU) peak memory
    in the log."""
    runs = sorted(glob.glob(os.path.join(results, "*")))
    if len(runs) != 1:
        return "fail", f"expected one run directory in {results}, found {len(runs)}"
    run = runs[0]
    missing = [p for p in (f"checkpoints/{steps:07d}.pt", f"checkpoints/{more:07d}.pt", "checkpoints/latest.pt",
                           f"samples/{steps:07d}.png") if not os.path.exists(os.path.join(run, p))]
    with open(os.path.join(run, "log.txt")) as f:
        log = f.read()
    if missing:
        return "fail", f"missing in {run}: {', '.join(missing)}"
    if gpu and "peak mem" not in log:
        return "fail", "log.txt does not report GPU peak memory"
    rates = re.findall(r"([\d.]+) steps/s", "".join(outputs))
    return "pass", (f"checkpoint at {steps}, sample grid, resumed to {more}"
                    + (f"; last logged {rates[-1]} steps/s" if rates else ""))


#################################################################################
#                                   Verdicts                                    #
#################################################################################


def training_verdicts(gpu, rows):
    """bf16+compile MFU against the target and ours against the peer, per setting."""
    verdicts = []
    for r in rows:
        if r["impl"] != "ours":
            continue
        text = f"{r['images_per_s']:.0f} images/s, {100 * r['mfu']:.1f}% MFU"
        text += f", {r['peak_mib']:.0f} MiB" if r["peak_mib"] else ""
        text += f"; ours / peer {r['ratio']:.2f}" if "ratio" in r else "; no peer in this run"
        name = f"DiT-XL/2 training {r['setting']}" if gpu else f"tiny training {r['setting']}"
        if gpu and r["setting"] == "bf16+compile":
            ok = r["mfu"] >= TARGET_TRAIN_MFU and r.get("ratio", float("inf")) < 1.0  # no peer: not shown
            verdicts.append((name, "pass" if ok else "fail",
                             text + f" (target >= {100 * TARGET_TRAIN_MFU:.0f}% MFU and faster than the peer)"))
        else:
            verdicts.append((name, "figure", text))
    return verdicts


def sampling_verdicts(gpu, rows):
    verdicts = []
    for r in rows:
        text = f"{r['images_per_s']:.2f} images/s, {100 * r['mfu']:.1f}% MFU ({r['guidance']})"
        if gpu:
            verdicts.append(("DiT-XL/2 250-step guided sampling", "pass" if r["mfu"] >= TARGET_SAMPLE_MFU else "fail",
                             text + f" (target >= {100 * TARGET_SAMPLE_MFU:.0f}% MFU)"))
        else:
            verdicts.append(("tiny guided sampling", "figure", text))
    return verdicts


def toy_verdicts(gpu, rows):
    """Per setting: the variants trained at the same time (one process each, as make toy runs them),
    so the wall time of the preset is the slower variant's, against the target."""
    verdicts = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        same = [r for r in rows if r["setting"] == setting]
        total = max(r["preset_minutes"] for r in same)
        text = (", ".join(f"{r['normalization']} {r['steps_per_s']:.0f} steps/s" for r in same)
                + f" side by side: {total:.1f} min for {same[0]['steps']} steps of both variants")
        if gpu:
            verdicts.append((f"toy paper preset {setting}", "pass" if total < TARGET_TOY_MINUTES else "fail",
                             text + f" (target < {TARGET_TOY_MINUTES:.0f} min)"))
        else:
            verdicts.append((f"toy cpu preset {setting}", "figure", text))
    return verdicts


def broken_verdict(part, rc, log):
    if rc == "skipped":
        return part, "skipped", "the check's time limit was reached before this part (raise --time-limit)"
    return part, "fail", f"exit {rc}; see {log} (figures above were measured before it stopped)"


def section(header, verdicts, parts, results):
    """The run as one markdown section for docs/benchmarks.md."""
    lines = [f"## {header['date']} | gpu-check | {header['device']}", "",
             f"- versions: {header['versions']}; commit: {header['commit']}",
             f"- command: `{header['command']}`; wall time {header['wall_s']:.0f} s"
             + ("" if header["gpu"] else " (no GPU found: CPU dry run with tiny shapes)"), ""]
    if header.get("note"):
        lines += [f"- {header['note']}", ""]
    peaks = {}
    for data in results.values():
        peaks.update(data["header"].get("peak_tflops", {}))
    if peaks:
        lines += ["- measured matmul peak: " + ", ".join(f"{p} {v:.3g} TFLOP/s" for p, v in peaks.items()), ""]
    lines += ["| check | verdict | figures |", "|---|---|---|"]
    lines += [f"| {name} | {verdict} | {text} |" for name, verdict, text in verdicts]
    lines += ["", "| part | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {rc} | {seconds:.0f} |" for name, (rc, seconds) in parts.items()]
    return "\n".join(lines) + "\n"


#################################################################################
#                                     Main                                      #
#################################################################################


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, help="run these parts only (default: all)")
    p.add_argument("--wheels", default=os.path.join(REPO, ".whl"),
                   help="folder of wheels (diffusers and its missing needs) to install when diffusers is missing")
    p.add_argument("--record", help="markdown file to insert the results into ('' = print only); default: "
                   "docs/benchmarks.md after a GPU run, nothing after the CPU dry run")
    p.add_argument("--out", help="folder for the parts' logs and JSON (default: a temporary folder)")
    p.add_argument("--cpu", action="store_true", help="the CPU dry run even when a GPU is present")
    p.add_argument("--time-limit", type=float, help="seconds for the whole check; each part gets at most what "
                   "is left, and parts that find too little left are skipped (default 560 on a GPU, 290 on a CPU)")
    p.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS",
                   help="change a part's time limit, e.g. --budget xl-train=400 (a slower GPU, a cold compile cache)")
    args = p.parse_args(argv)
    budgets = {}
    for item in args.budget:
        part, _, seconds = item.partition("=")
        try:
            budgets[part] = float(seconds)
        except ValueError:
            budgets[part] = -1.0
        if part not in PARTS or budgets[part] <= 0:
            p.error(f"--budget {item!r}: write PART=SECONDS with PART one of {', '.join(PARTS)} and SECONDS > 0")
    args.budget = budgets
    return args


class Check:
    """What the parts share: GPU or not, the output folder, the child environment, the time budget, and
    what each part reports (exit codes and seconds, verdict rows, the benchmarks' JSON)."""

    def __init__(self, gpu, out, env, budget):
        self.gpu, self.out, self.env, self.budget = gpu, out, env, budget
        self.parts, self.verdicts, self.results = {}, [], {}


def gpu_test_files():
    """The test files that mark a test `gpu`: only these are collected (collecting the whole suite imports
    every test module, seconds the check's budget does not have)."""
    folder = os.path.join(REPO, "tests")
    files = sorted(glob.glob(os.path.join(folder, "test_*.py")))
    return [f for f in files if "mark.gpu" in open(f).read()] or [folder]


def part_tests(c):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()]
    rc, sec, text = run_part("tests", cmd, c.budget["tests"], c.out, c.env)
    c.parts["tests"] = (rc, sec)
    c.verdicts.append(("GPU-only tests",) + check_tests(c.gpu, rc, text))


def part_train(c):
    """train.py with a checkpoint and a sample grid, then --resume to a later step."""
    work = os.path.join(c.out, "train-work")  # the digits data and the run, kept for a look afterwards
    shutil.rmtree(work, ignore_errors=True)  # a previous check's run in the same --out
    first, steps, more, runs, speed = train_cmds(c.gpu, work)
    train_limit = c.budget["train"]
    rc, sec, text1 = run_part("train", first, 0.6 * train_limit, c.out, c.env)
    text2 = ""
    made = sorted(glob.glob(os.path.join(runs, "*")))
    if rc == 0 and made:
        resume = [sys.executable, os.path.join(REPO, "train.py"), "--resume", made[-1], "--max-steps", str(more),
                  "--num-workers", "1", *speed]
        rc, sec2, text2 = run_part("train", resume, min(train_limit - sec, c.budget["train"]), c.out, c.env)
        sec += sec2
    c.parts["train"] = (rc, sec)
    flags = " ".join(f for f in speed if f not in ("--device", "cuda", "cpu"))
    c.verdicts.append((f"train.py {flags}: checkpoint, grid, resume",)
                      + (check_train(c.gpu, runs, steps, more, [text1, text2]) if rc == 0 else
                         ("fail", f"exit {rc}; see {c.out}/train.log")))


def part_bench(c, part):
    """xl-train or xl-sample: one bench.py run."""
    json_path = os.path.join(c.out, f"{part}.json")
    rc, sec, _ = run_part(part, bench_cmd(c.gpu, json_path, part), c.budget[part], c.out, c.env)
    c.parts[part] = (rc, sec)
    data = read_json(json_path)
    if data is not None:
        c.results[part] = data
        c.verdicts += (training_verdicts(c.gpu, data["training"]) if part == "xl-train"
                       else sampling_verdicts(c.gpu, data["sampling"]))
    if rc != 0:
        c.verdicts.append(broken_verdict(part, rc, f"{c.out}/{part}.log"))


def part_toy(c):
    """make toy trains the two variants side by side, so they are timed side by side: one process each,
    at the same time, eager, compiled, and compiled with CUDA graphs (the CPU dry run skips compiling)."""
    rcs, total, toy_limit = [], 0.0, c.budget["toy"]
    for setting, share in (TOY_SETTINGS if c.gpu else [("eager", 1.0)]):
        cmds = {}
        for norm in ("layer-norm", "none"):
            json_path = os.path.join(c.out, f"toy-{setting}-{norm}.json")
            cmds[json_path] = (bench_cmd(c.gpu, json_path, "toy") + ["--toy-variants", norm]
                               + ([] if setting == "eager" else ["--toy-compile", setting]))
        limit = min(share * toy_limit, toy_limit - total)
        rc, sec = run_concurrently(f"toy-{setting}", list(cmds.values()), limit, c.out, c.env)
        rcs.append(rc)
        total += sec
        rows = []
        for json_path in cmds:
            data = read_json(json_path)
            if data is not None:
                c.results[os.path.basename(json_path)[:-5]] = data
                rows += data["toy"]
        if len(rows) == 2:
            c.verdicts += toy_verdicts(c.gpu, rows)
    rc = next((r for r in rcs if r != 0), 0)
    c.parts["toy"] = (rc, total)
    if rc != 0:
        c.verdicts.append(broken_verdict("toy", rc, f"{c.out}/toy-*.log"))


def report(c, args, argv, note, start):
    """Print the section and the verdicts, record the section, write summary.json."""
    # Versions as the parts saw them (carried wheels live on the child processes' PYTHONPATH only).
    seen = next((d["header"]["versions"] for d in c.results.values()), None)
    header = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                  device=device_name(torch.device("cuda" if c.gpu else "cpu")), versions=seen or versions(),
                  commit=git_commit(), gpu=c.gpu, wall_s=time.perf_counter() - start, note=note,
                  command="python -m benchmarks.gpu_check " + shlex.join(argv if argv is not None else sys.argv[1:]))
    text = section(header, c.verdicts, c.parts, c.results)
    print("\n" + ("" if c.gpu else "No GPU found: this was the CPU dry run; the GPU figures are still open.\n") + text)
    print("\n".join(f"{verdict:>6}  {name}: {figures}" for name, verdict, figures in c.verdicts))
    record_to = args.record
    if record_to is None:  # default: a GPU run is recorded, the CPU dry run is not
        record_to = os.path.join(REPO, "docs", "benchmarks.md") if c.gpu else ""
    if record_to:
        record(record_to, text)
        print(f"recorded in {record_to}")
    else:
        print("not recorded (the CPU dry run records only with --record PATH)" if not c.gpu else "not recorded")
    with open(os.path.join(c.out, "summary.json"), "w") as f:
        json.dump(dict(header=header, verdicts=c.verdicts, parts=c.parts, results=c.results), f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.cpu
    out = args.out or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same code path, tiny, on the CPU
        print("No GPU found: running the CPU dry run with tiny shapes (the GPU figures need a GPU).", flush=True)
    note = install_wheels(args.wheels, env)
    if note:
        print(note, flush=True)
    time_limit = args.time_limit or (560 if gpu else 290)
    c = Check(gpu, out, env, Budget({**(GPU_BUDGET if gpu else CPU_BUDGET), **args.budget}, start + time_limit))
    todo = args.only or PARTS
    runners = {"tests": part_tests, "train": part_train, "xl-train": lambda c: part_bench(c, "xl-train"),
               "xl-sample": lambda c: part_bench(c, "xl-sample"), "toy": part_toy}
    for part in PARTS:
        if part in todo:
            runners[part](c)
    report(c, args, argv, note, start)
    broken = [name for name, (rc, _) in c.parts.items() if rc != 0]
    if broken:
        print(f"parts that did not finish: {', '.join(broken)} (logs in {out})")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
