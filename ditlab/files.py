"""Files: atomic writes, JSON and JSON-lines helpers, output paths checked before the work, and the
provenance line of study reports.

This module is at the bottom of the package: it imports only ditlab.errors."""

import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile

from ditlab.errors import InputError, UsageError


def truncate_jsonl(paths, step):
    """On resume, drop the rows of these .jsonl logs newer than the checkpoint's step: training continues
    from there and writes them again (identically), so nothing appears twice."""
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            atomic_write(path, lambda f: f.write("".join(rows).encode()))


def write_json(path, obj):
    """Write `obj` as indented, key-sorted JSON to `path`, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


#################################################################################
#                              Writing files safely                             #
#################################################################################


class NotARegularFile(InputError):
    """An output path names something that is not a regular file (a directory, a device, a pipe)."""


def output_target(path):
    """The file a write to `path` should replace: `path` itself, or what a symlink at `path` points to
    (so that the link stays a link). NotARegularFile when that exists and is not a regular file: a
    directory, a device node or a pipe is never replaced."""
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        kind = "a directory" if os.path.isdir(target) else "not a regular file"
        raise NotARegularFile(f"{path} is {kind}; give the path of a file to write")
    return target


def check_output_file(path, flag, extensions=None):
    """Before any work: `path` (given as `flag`) can be written. UsageError when its name lacks one of
    `extensions`; InputError when it is a directory, a device or a pipe, or when its folder (created here
    if missing) is not writable. Returns path."""
    if extensions and not path.lower().endswith(tuple(extensions)):
        raise UsageError(f"{flag} {path}: give a file name ending in {' or '.join(extensions)}")
    try:
        target = output_target(path)
    except NotARegularFile as e:
        raise NotARegularFile(f"{flag}: {e}") from None
    writable_folder(os.path.dirname(target), f"{flag} {path}: its folder")
    return path


def check_output_dir(path, flag):
    """Before any work: `path` is a folder that exists (created here) and is writable; InputError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file; give a folder (it is created if missing)")
    writable_folder(path, f"{flag}")
    return path


def writable_folder(folder, what):
    """Create `folder` if missing; InputError starting with `what` when that fails or it is not writable."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what} {folder} cannot be created: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what} {folder} is not writable")


def umask_mode():
    """0666 less the process's umask: the mode open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def new_file_mode(target):
    """The permission bits the written file gets: an existing file's own, else umask_mode() (the temp
    file it is written to starts at 0600)."""
    return os.stat(target).st_mode & 0o7777 if os.path.isfile(target) else umask_mode()


def share_like_open(folder):
    """Give every file under `folder` umask_mode(): for folders that a third-party writer (safetensors
    through a temp file) leaves at 0600, so that colleagues on a shared file system can read them."""
    mode = umask_mode()
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, mode)


def atomic_write(path, write_fn):
    """Write a file through `write_fn(fileobj)` into a temp file next to `path`, then rename it over
    `path`: a crash at any point leaves either the old file or the new one, never a partial file. The
    file gets the mode open() would give it (new_file_mode), a symlink is written through, and anything
    that is not a regular file is refused (output_target)."""
    target = output_target(path)
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(target))
    try:
        os.chmod(tmp, new_file_mode(target))
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_page(page, text, out, figures):
    """Write a report's markdown `text` to the results page `page` with its figures beside it: every
    figures[name] (a file in `out` the text links as `](name)`) is copied to the page's ../figures/ under
    the name figures[name] and the link rewritten to it, so docs/results/*.md link docs/figures/*.png
    and a second page of the same study (its own names) never overwrites the first page's figures."""
    folder = os.path.join(os.path.dirname(os.path.abspath(page)), os.pardir, "figures")
    for name, target in figures.items():
        source = os.path.join(out, name)
        if not os.path.isfile(source):
            continue
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(source, os.path.join(folder, target))
        text = text.replace(f"]({name})", f"](../figures/{target})")
    atomic_write(page, lambda f: f.write(text.encode()))


def append_jsonl(path, rows):
    """Append dicts to a JSON-lines file."""
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def provenance(argv=None):
    """One markdown line saying what wrote a report: the command, the commit (and whether the tree had
    changes), the machine (CPU model and core count, or the GPU) and the date. Every study report starts
    with it, so a table is never separated from the run that measured it."""
    import torch  # lazily: the rest of this module needs no torch

    argv = sys.argv if argv is None else argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        machine = f"{cpu}, {os.cpu_count()} cores"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"_Written by `python {shlex.join(argv)}` at commit {commit} on {machine}, {date}._"


def read_log(path):
    """A job's log ("" when it does not exist yet)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def log_tail(path, lines=15):
    """The last lines of a log file, for an error message."""
    return "".join(read_log(path).splitlines(keepends=True)[-lines:])
