"""Run one of the repository's studies: `python study.py NAME [flags]`, `python study.py NAME --help`.

    toy        LayerNorm vs none on the toy identity task, sampled and probed per timestep (make toy)
    sweep      the same, one factor at a time around the toy's CPU preset (make sweep)
    ablation   every normalization variant on the toy (make ablation)
    digits     the normalization variants on trained digit models, each at its best lr (make digits)
    mechanism  where and why LayerNorm costs the toy precision: localise, ablate, restore, stress (make mechanism)
    bridge     why the toy's LayerNorm cost does not reach digit images: probes and edits on both (make bridge)

Every study runs its jobs through one runner (ditlab/studies/runner.py): local subprocesses by default,
--parallel at a time, or SLURM jobs (--cluster slurm --partition P --time MINUTES --gpus-per-job N).
Flags a study does not know go to the training command it runs (train_toy.py or train.py), where it says so.
"""

import importlib
import sys

from ditlab.cli import command

STUDIES = {"toy": "toy", "sweep": "sweep", "ablation": "ablation", "digits": "digits", "mechanism": "mechanism",
           "bridge": "bridge"}
PASSES_ON = ("toy", "sweep", "ablation")  # these hand unknown flags to train_toy.py; the others refuse them


@command
def main(argv=None):
    """Dispatch `argv` = [NAME, flags...] to the study's parser and run it; returns what the study returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in STUDIES:
        raise SystemExit(f"study.py: unknown study {name!r}; choose one of {', '.join(STUDIES)} "
                         "(python study.py --help)")
    module = importlib.import_module(f"ditlab.studies.{STUDIES[name]}")
    parser = module.parser()
    if name in PASSES_ON:
        args, extra = parser.parse_known_args(rest)
    else:
        args, extra = parser.parse_args(rest), []
    return module.run(args, extra)


if __name__ == "__main__":
    main()
