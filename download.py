"""Download the official DiT-XL/2 weights once into pretrained_models/ (as the reference repo's download.py).

    python download.py                         # both: DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt
    python download.py DiT-XL-2-256x256.pt

sample.py, sample_ddp.py and the other commands download an official name by themselves the first time
they see it (ditlab.checkpoints.find_model); this command is for fetching ahead, e.g. on a login node
before a job runs on machines without internet. Each file is written under a temporary name and renamed
when complete, and then loaded with weights_only=True to check that it is a plain state dict.
"""

import argparse

from ditlab.checkpoints import PRETRAINED_MODELS, download_model, find_model
from ditlab.cli import command


@command
def main(argv=None):
    """Download the named official files (default: all) and check that each is a plain state dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="NAME",
                   help=f"official file names (default: all of {', '.join(PRETRAINED_MODELS)})")
    args = p.parse_args(argv)
    unknown = [name for name in args.models if name not in PRETRAINED_MODELS]
    if unknown:
        p.error(f"not an official file: {', '.join(unknown)}; choose from {', '.join(PRETRAINED_MODELS)}")
    args.models = args.models or list(PRETRAINED_MODELS)
    for name in args.models:
        path = download_model(name)
        find_model(name)  # refuses anything that is not a plain state dict
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
