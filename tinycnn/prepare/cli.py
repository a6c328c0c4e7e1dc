"""The `tinycnn-prepare` command line."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.text import Text

from .downloader import DEFAULT_URL, HF_REPO, OFFICIAL_MD5, download_hf, download_official
from .errors import PrepareError
from .folder import is_prepared
from .pipeline import prepare
from .shards import SPLITS

_EPILOG = """\
sources:
  tiny-imagenet-200.zip   the official zip, read in place (any single top folder, or none)
  FOLDER                  the extracted zip (the folder holding wnids.txt, or its parent)
  FOLDER                  Hugging Face parquet files (train-*.parquet, valid-*.parquet below it)
  download                fetch the official zip (or with --hf the parquet files) first

splits (default): train = official train minus --holdout images per class, val = the held-out
images, test = the official validation images. --holdout 0: train = all train images, val = official
validation, no test. The official test images have no labels and are left out unless
--include-unlabeled (split 'unlabeled', cls -1).

Every image is decoded once: a truncated or non-JPEG file, an image that is not 64x64 (read from
its header, before decoding), an image file over 4 MiB, a symbolic link out of a source folder, an
unknown wnid or a duplicate key stops the run (exit 2) naming the file; --skip-bad leaves such files
out and lists them in manifest.json. A source larger than Tiny ImageNet can be (members, bytes) is
refused before reading it. Output appears only when complete (built in DIR.tmp-<pid>-*, removed by
the next run if this one is killed); DIR.lock stops a second prepare into DIR. --force replaces
only a folder tinycnn-prepare wrote (nothing in it but its shards and json files).
manifest.json records the source's path, size and fingerprint: re-running with another source
into a prepared DIR is an error unless --force.

--compress writes gzip-compressed shards (<split>-NNNNN.tar.gz, ~0.4x the bytes of plain ones, ~0.7x
the JPEG bytes; webdataset, timm and tinycnn read them as they are): for readers that pay for
bandwidth (object storage, HTTP, many nodes). On a local disk plain shards read faster.

examples:
  tinycnn-prepare ~/Downloads/tiny-imagenet-200.zip --out shards/tiny-imagenet
  tinycnn-prepare data/tiny-imagenet-200 --out shards/tiny-imagenet --holdout 0
  tinycnn-prepare data/hf-tiny-imagenet --out shards/tiny-imagenet --num-shards train=32,val=8,test=8
  tinycnn-prepare ~/Downloads/tiny-imagenet-200.zip --out shards/tiny-imagenet-gz --compress
  tinycnn-prepare download --out shards/tiny-imagenet
  tinycnn-prepare download --hf --out shards/tiny-imagenet
  tinycnn-prepare download --url http://mirror.example/tiny-imagenet-200.zip --out shards/tiny-imagenet
"""


def _parse_num_shards(text: str):
    if text.strip().isdigit() and int(text) > 0:
        return int(text)
    counts = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1 or name.strip() not in SPLITS:
            raise argparse.ArgumentTypeError(f"expected e.g. train=64,val=16,test=16 or one number, got {text!r}")
        counts[name.strip()] = int(value)
    return counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinycnn-prepare", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Write Tiny ImageNet as WebDataset shards (original JPEG bytes; label = index of the wnid in\n"
                    "the sorted wnids) with manifest.json and timm's _info.json. Layout: shards/README.md.")
    p.add_argument("source", help="tiny-imagenet-200.zip, its extracted folder, a folder of parquet files, "
                                  "or 'download'")
    p.add_argument("--out", type=Path, default=Path("shards/tiny-imagenet"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--holdout", type=int, default=50, metavar="N",
                   help="train images per class held out as val; 0: official validation as val, no test "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout and the shuffle (default: %(default)s)")
    p.add_argument("--num-shards", type=_parse_num_shards, default=None, metavar="SPEC",
                   help="shards per split, e.g. train=64,val=16,test=16 (the default), or one number for all")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad images and list them in manifest.json")
    p.add_argument("--force", action="store_true", help="rebuild an output folder that is already prepared")
    p.add_argument("--include-unlabeled", action="store_true",
                   help="also write the official unlabeled test images as split 'unlabeled' (cls -1)")
    p.add_argument("--include-unlabeled-test", dest="include_unlabeled", action="store_true",
                   help=argparse.SUPPRESS)  # the flag's old name
    p.add_argument("--compress", action="store_true",
                   help="gzip-compressed shards (<split>-NNNNN.tar.gz): ~0.4x the bytes, for remote readers")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the decode check and the shard writing (default: all usable cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars and no summary table")
    d = p.add_argument_group("download (with source 'download')")
    d.add_argument("--url", default=None, help=f"where to fetch the zip (default: {DEFAULT_URL}); "
                                               "a mirror is checked against the official md5 unless told otherwise")
    d.add_argument("--hf", action="store_true", help=f"fetch the parquet files of {HF_REPO} via huggingface_hub")
    d.add_argument("--md5", default=None, help=f"expected md5 of the zip (default: the official {OFFICIAL_MD5})")
    d.add_argument("--sha256", default=None, help="expected sha256 of the zip (given alone, it replaces the md5 check)")
    d.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    d.add_argument("--download-dir", type=Path, default=None,
                   help="where downloads go (default: OUT/../downloads); a partial download there is resumed")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    is_download = args.source == "download"
    download_flags = [f for f, v in (("--url", args.url), ("--hf", args.hf), ("--md5", args.md5),
                                     ("--sha256", args.sha256), ("--no-verify", args.no_verify),
                                     ("--download-dir", args.download_dir)) if v]
    if download_flags and not is_download:
        parser.error(f"{', '.join(download_flags)} only go with the source 'download'")
    console = Console(stderr=True)
    progress = not args.no_progress
    try:
        with _stop_on_termination():
            source = args.source
            if is_download:
                source = _download_source(args, progress)
            prepare(source, args.out, holdout_per_class=args.holdout, seed=args.seed, num_shards=args.num_shards,
                    skip_bad=args.skip_bad, force=args.force, include_unlabeled=args.include_unlabeled,
                    compress=args.compress, workers=args.workers, progress=progress)
    except PrepareError as e:
        console.print(Text(f"error: {e}", style="bold red"), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print(Text("interrupted; nothing was left in the output folder", style="red"))
        return 130
    return 0


def _download_source(args, progress: bool) -> Optional[Path]:
    """The downloaded source for `tinycnn-prepare download`; None when --out is already prepared
    (prepare() then only checks its settings)."""
    if not args.force and is_prepared(args.out):
        return None
    out = args.out.expanduser().absolute()
    where = args.download_dir or out.parent / "downloads"
    if args.hf:
        return download_hf(where)
    md5 = None if args.no_verify else (args.md5 or (None if args.sha256 else OFFICIAL_MD5))
    sha256 = None if args.no_verify else args.sha256
    return download_official(out, where, args.url or DEFAULT_URL, md5, sha256, progress)


@contextlib.contextmanager
def _stop_on_termination():
    """SIGTERM and SIGHUP (a scheduler or a closed terminal) stop the run like Ctrl-C: the temporary folder
    is removed and the pool shut down, instead of the process vanishing mid-write."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
