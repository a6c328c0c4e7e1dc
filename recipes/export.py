#!/usr/bin/env python
"""Export tinycnn weights as a timm model folder (config.json + model.safetensors), or push them to the Hub.

    tinycnn-export checkpoints/recommended/best.safetensors --out tinycnn-tiny-imagenet
    tinycnn-export checkpoints/recommended/best.safetensors --push user/tinycnn-tiny-imagenet

Then, in any code that has run `import tinycnn` (which registers the architecture with timm):
    timm.create_model("local-dir:tinycnn-tiny-imagenet", pretrained=True)
    timm.create_model("hf-hub:user/tinycnn-tiny-imagenet", pretrained=True)
and timm's validate.py/train.py take the same names after `import tinycnn` (see README.md).
Needs huggingface_hub: pip install "tinycnn[hub]".
"""
import argparse
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import run_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="a .safetensors file written by tinycnn (or an exported folder)")
    parser.add_argument("--out", metavar="DIR", help="folder to write (replaced if it holds an earlier export)")
    parser.add_argument("--push", metavar="REPO_ID", help="push to this Hugging Face Hub repository (user/name)")
    parser.add_argument("--private", action="store_true", help="create the --push repository as private")
    args = parser.parse_args()
    if not args.out and not args.push:
        parser.error("give --out DIR, --push REPO_ID, or both")

    from tinycnn.hub import export_hub, push_hub
    from tinycnn.weights import WeightsError

    if args.out:
        out = export_hub(args.weights, args.out)
        print(f"wrote {out}/: timm.create_model('local-dir:{out}', pretrained=True) after `import tinycnn`")
    if args.push:
        try:
            url = push_hub(args.weights, args.push, private=args.private)
        except WeightsError:
            raise
        except Exception as e:  # huggingface_hub's and httpx's errors: bad repo id, no token, no rights, no network
            first_line = (str(e).splitlines() or [""])[0]
            hint = "" if isinstance(e, ValueError) else " (check the network; log in with `hf auth login` or set HF_TOKEN)"
            raise WeightsError(f"pushing to {args.push} failed: {type(e).__name__}: {first_line}{hint}") from e
        print(f"pushed {url}: timm.create_model('hf-hub:{args.push}', pretrained=True) after `import tinycnn`")
    return 0


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
