"""Files: atomic writes, JSON and JSON-lines helpers."""

import contextlib
import json
import os
import tempfile


def truncate_jsonl(paths, step):
    """On resume, drop the rows of these .jsonl logs newer than the checkpoint's step: training continues
    from there and writes them again (identically), so nothing appears twice."""
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            atomic_write(path, lambda f: f.write("".join(rows).encode()))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


#################################################################################
#                              Checkpoint I/O                                   #
#################################################################################


def atomic_write(path, write_fn):
    """Write a file through `write_fn(fileobj)` into a temp file next to `path`, then rename it over
    `path`: a crash at any point leaves either the old file or the new one, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def append_jsonl(path, rows):
    """Append dicts to a JSON-lines file."""
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
