"""`tinycnn-prepare`: turn Tiny ImageNet into WebDataset shards (format: shards/README.md).

Sources: the official `tiny-imagenet-200.zip` (read in place), its extracted folder, or a folder of
Hugging Face parquet files (`zh-plus/tiny-imagenet`). `tinycnn-prepare download` fetches the zip first.

Every image is strict-decoded once (in parallel) so that a truncated, non-JPEG or wrongly sized image
is refused before anything is written; shards keep the original JPEG bytes. The output is built in a
temporary folder beside `--out` and renamed into place only when complete, so a folder holding a
manifest.json is always a complete dataset.

Every input is untrusted: reads are capped in size before they happen, image sizes come from the JPEG
header before decoding, a source folder is never left through a symbolic link, downloads end within a
deadline and a size cap, and nothing is replaced or removed that tinycnn-prepare did not write. Each
refusal is one PrepareError line naming the file and what to do.

The package, in the order the data flows: `sources` reads the three layouts (and fingerprints them),
`check` decode-checks the images in worker processes, `shards` splits and writes them, `folder` owns
the output folder's life cycle (lock, temporary folder, install, manifest), `downloader` fetches a
source, `pipeline` runs it all (`prepare`, `ensure_prepared`) and `cli` is the command line.
"""
from .cli import main
from .downloader import DEFAULT_URL, HF_REPO, OFFICIAL_MD5, download, download_hf
from .errors import PrepareError
from .folder import is_prepared
from .pipeline import ensure_prepared, prepare

__all__ = ["PrepareError", "prepare", "download", "download_hf", "ensure_prepared", "is_prepared", "main",
           "DEFAULT_URL", "OFFICIAL_MD5", "HF_REPO"]
