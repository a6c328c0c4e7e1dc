"""A synthetic stand-in for the Tiny ImageNet sample, for checkouts without the real one.

`write_sample(folder)` writes what the real sample folder holds (see tests/conftest.py), in the same layouts:

- `tiny-imagenet-200-sample.zip`: the official `tiny-imagenet-200.zip` layout, `tiny-imagenet-200/{wnids.txt,
  words.txt, train/<wnid>/images/<wnid>_<i>.JPEG, train/<wnid>/<wnid>_boxes.txt, val/images/val_<i>.JPEG,
  val/val_annotations.txt, test/images/test_<i>.JPEG}`, JPEGs stored, members in the official zip's order;
- `tiny-imagenet-hf-sample/data/{train,valid}-00000-of-00001.parquet` (when pyarrow is installed): the Hugging Face
  `zh-plus/tiny-imagenet` layout, columns `image` {bytes, path} and `label` (int64), the schema metadata key
  `huggingface` holding a ClassLabel of 200 sorted wnids that the labels index; the very same JPEG bytes as the zip.

Sizes and quirks are the real sample's, so the tests' counts hold on either: the first 10 wnids of the official
wnids.txt (unsorted, no trailing newline), 500 train and 50 val images a class, 100 unlabeled test images with
sparse numbers, 68 grayscale (mode L) train JPEGs, 9 in val and 1 in test, a words.txt naming more WordNet ids than
the classes, bounding boxes after the wnid in val_annotations.txt. The images are 64x64 JPEGs of ~2 KB.

Each class is a colour and a stripe orientation (grayscale images keep only the stripes), each image draws its own
phase, stripe width, brightness, colour shift, noise and a bright or dark blob: a small CNN learns the classes well
above chance in an epoch or two (test_train.py checks it on whichever sample it gets).

`python tests/synthetic.py FOLDER` writes the same files into FOLDER (a TINYCNN_SAMPLE_DATA for benchmarks or
scripts on a machine without the real sample).
"""
import colorsys
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ZIP_NAME = "tiny-imagenet-200-sample.zip"
PARQUET_DIR = "tiny-imagenet-hf-sample"
TOP = "tiny-imagenet-200/"

# The first 10 lines of the official wnids.txt (the real sample's classes) and their words.txt names.
WNIDS = ["n02124075", "n04067472", "n04540053", "n04099969", "n07749582",
         "n01641577", "n02802426", "n09246464", "n07920052", "n03970156"]
NAMES = {"n02124075": "Egyptian cat", "n04067472": "reel", "n04540053": "volleyball",
         "n04099969": "rocking chair, rocker", "n07749582": "lemon", "n01641577": "bullfrog, Rana catesbeiana",
         "n02802426": "basketball", "n09246464": "cliff, drop, drop-off", "n07920052": "espresso",
         "n03970156": "plunger, plumber's helper"}
# words.txt lists all of WordNet (82k ids), not only the classes: a few others around ours, the file's first and last
OTHER_WORDS = {"n00001740": "entity", "n00001930": "physical entity", "n00002137": "abstraction, abstract entity",
               "n01443537": "goldfish, Carassius auratus", "n02123045": "tabby, tabby cat",
               "n04067231": "refectory table", "n07747607": "orange", "n15300051": "9/11, 9-11, September 11"}

TRAIN_PER_CLASS, VAL_PER_CLASS, NUM_TEST = 500, 50, 100
GRAYSCALE = {"train": 68, "val": 9, "test": 1}  # as in the real sample
SIZE = 64


def hf_class_names():
    """The 200 sorted names of the parquet's ClassLabel: ours among 190 made-up wnids (so labels are not 0..9)."""
    made_up = [f"n{1_000_000 + 50_000 * i:08d}" for i in range(200 - len(WNIDS))]
    assert not set(made_up) & set(WNIDS)
    return sorted(WNIDS + made_up)


def _class_colour(c):
    r, g, b = colorsys.hsv_to_rgb(c / len(WNIDS), 0.65, 0.8)
    return np.array([r, g, b], dtype=np.float32) * 255


def render(c, n, rng):
    """n uint8 images (n, 64, 64, 3) of class c: its colour and stripe orientation, everything else drawn per image."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    angle = math.pi * c / len(WNIDS)  # 18 degrees apart
    along = (xx * math.cos(angle) + yy * math.sin(angle))[None]
    freq = rng.uniform(2.5, 4.5, (n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, (n, 1, 1)).astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * along + phase)                  # (n, 64, 64) in [0, 1]
    # a soft blob somewhere: local content that is no cue to the class
    cy, cx = rng.uniform(0.1, 0.9, (2, n, 1, 1)).astype(np.float32)
    blob = np.exp(-((yy[None] - cy) ** 2 + (xx[None] - cx) ** 2) / 0.02) * rng.choice([-0.5, 0.5], (n, 1, 1))
    shade = np.clip(0.45 + 0.55 * stripes + blob, 0, 1.3) * rng.uniform(0.7, 1.2, (n, 1, 1))
    colour = _class_colour(c)[None] + rng.normal(0, 18, (n, 3))                        # (n, 3)
    # noise of a level drawn per image: JPEGs of 1.5-2.5 KB, as the real ones
    noise = rng.normal(0, 1, (n, SIZE, SIZE, 3)) * rng.uniform(3, 14, (n, 1, 1, 1))
    img = shade[..., None] * colour[:, None, None, :] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(pixels, gray=False):
    image = Image.fromarray(pixels, "RGB")
    if gray:
        image = image.convert("L")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _box(rng):
    x0, y0 = rng.integers(0, 24, 2)
    x1, y1 = rng.integers(40, SIZE, 2)
    return f"{x0}\t{y0}\t{x1}\t{y1}"


def build(seed=0, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, num_test=NUM_TEST):
    """(zip members as [(name, bytes)] in the official zip's order, train rows, valid rows) of the sample.

    Rows are (path, bytes, wnid) for the parquet files, in the order the real parquet files list them."""
    rng = np.random.default_rng(seed)
    n_classes = len(WNIDS)
    n_val = val_per_class * n_classes
    gray_train = set(rng.choice(train_per_class * n_classes, GRAYSCALE["train"], replace=False).tolist())
    gray_val = set(rng.choice(n_val, GRAYSCALE["val"], replace=False).tolist())
    gray_test = set(rng.choice(num_test, GRAYSCALE["test"], replace=False).tolist())

    words = {**OTHER_WORDS, **NAMES}
    members = [(TOP + "wnids.txt", "\n".join(WNIDS).encode()),  # no trailing newline, as the real file
               (TOP + "words.txt", "\n".join(f"{w}\t{words[w]}" for w in sorted(words)).encode())]
    train_rows = []
    for c, wnid in enumerate(WNIDS):
        pixels = render(c, train_per_class, rng)
        files = {}
        for i in range(train_per_class):
            files[f"{wnid}_{i}.JPEG"] = jpeg(pixels[i], gray=c * train_per_class + i in gray_train)
        boxes = "".join(f"{name}\t{_box(rng)}\n" for name in files)
        members.append((f"{TOP}train/{wnid}/{wnid}_boxes.txt", boxes.encode()))
        for name in sorted(files):  # the zip's order: names sorted as strings (_0, _1, _10, _100, ...)
            members.append((f"{TOP}train/{wnid}/images/{name}", files[name]))
            train_rows.append((name, files[name], wnid))

    # val: the official images are numbered 0..9,999 over 200 classes; the sample keeps its classes' numbers
    numbers = np.sort(rng.choice(10_000, n_val, replace=False))
    labels = rng.permutation(np.repeat(np.arange(n_classes), val_per_class))
    val_pixels = {c: iter(render(c, val_per_class, rng)) for c in range(n_classes)}
    val, annotations = [], []
    for j, (number, c) in enumerate(zip(numbers.tolist(), labels.tolist())):
        name = f"val_{number}.JPEG"
        val.append((name, jpeg(next(val_pixels[c]), gray=j in gray_val), WNIDS[c]))
        annotations.append(f"{name}\t{WNIDS[c]}\t{_box(rng)}\n")
    members.append((TOP + "val/val_annotations.txt", "".join(annotations).encode()))
    members += [(f"{TOP}val/images/{name}", data) for name, data, _ in val]

    # test: unlabeled, of any class
    test = {}
    for t, number in enumerate(np.sort(rng.choice(10_000, num_test, replace=False)).tolist()):
        c = int(rng.integers(n_classes))
        test[f"test_{number}.JPEG"] = jpeg(render(c, 1, rng)[0], gray=t in gray_test)
    members += [(f"{TOP}test/images/{name}", test[name]) for name in sorted(test)]
    return members, train_rows, val


def write_zip(members, path):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            # the official zip stores the JPEGs and deflates words.txt
            z.writestr(name, data, zipfile.ZIP_DEFLATED if name.endswith("words.txt") else zipfile.ZIP_STORED)
    return path


def write_parquet(rows, path):
    """rows [(path, bytes, wnid)] as a Hugging Face parquet file; False when pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    names = hf_class_names()
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    table = pa.table({
        "image": pa.array([{"bytes": data, "path": name} for name, data, _ in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([names.index(wnid) for _, _, wnid in rows], pa.int64()),
    }).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return True


def write_sample(folder, seed=0, parquet=True, **sizes):
    """Write the synthetic sample into folder (created): the zip, and the parquet files if pyarrow is there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    members, train_rows, val_rows = build(seed, **sizes)
    write_zip(members, folder / ZIP_NAME)
    if parquet:
        data = folder / PARQUET_DIR / "data"
        if write_parquet(train_rows, data / "train-00000-of-00001.parquet"):
            write_parquet(val_rows, data / "valid-00000-of-00001.parquet")
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/synthetic.py FOLDER")
    print(write_sample(sys.argv[1]))
