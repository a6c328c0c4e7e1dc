"""The synthetic sample (tests/synthetic.py) that the end-to-end tests fall back to without the real one: the official
layouts with the real sample's sizes and quirks, images a model can tell apart, and, where the real sample is there,
the same structure as it."""
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import synthetic

TOP = synthetic.TOP


def official_layout(zip_path):
    """What a check of the official layout needs, read straight from the zip (independently of tinycnn.prepare)."""
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        wnids_txt = z.read(TOP + "wnids.txt")
        words = dict(line.split("\t", 1) for line in z.read(TOP + "words.txt").decode().splitlines())
        annotations = [line.split("\t") for line in z.read(TOP + "val/val_annotations.txt").decode().splitlines()]
        modes = Counter()
        for name in names:
            if name.endswith(".JPEG"):
                image = Image.open(io.BytesIO(z.read(name)))
                assert image.format == "JPEG" and image.size == (64, 64), name
                modes[name.split("/")[1], image.mode] += 1
        boxes = {name: z.read(name).decode().splitlines() for name in names if name.endswith("_boxes.txt")}
    return names, wnids_txt, words, annotations, modes, boxes


def parquet_layout(folder):
    pq = pytest.importorskip("pyarrow.parquet")
    out = {}
    for split in ("train", "valid"):
        table = pq.read_table(Path(folder) / "data" / f"{split}-00000-of-00001.parquet")
        meta = json.loads(table.schema.metadata[b"huggingface"])
        out[split] = (str(table.schema.field("image").type), str(table.schema.field("label").type),
                      meta["info"]["features"]["label"], table.to_pylist())
    return out


def test_the_zip_has_the_official_layout_and_the_real_quirks(synthetic_data):
    names, wnids_txt, words, annotations, modes, boxes = official_layout(synthetic_data / synthetic.ZIP_NAME)
    wnids = wnids_txt.decode().split("\n")
    assert wnids == synthetic.WNIDS and wnids != sorted(wnids) and not wnids_txt.endswith(b"\n")
    assert set(wnids) < set(words) and words["n02124075"] == "Egyptian cat"  # words.txt names more than the classes
    for wnid in wnids:
        images = [n for n in names if n.startswith(f"{TOP}train/{wnid}/images/")]
        assert set(images) == {f"{TOP}train/{wnid}/images/{wnid}_{i}.JPEG" for i in range(500)}
        lines = boxes[f"{TOP}train/{wnid}/{wnid}_boxes.txt"]
        assert sorted(line.split("\t")[0] for line in lines) == sorted(n.rsplit("/", 1)[1] for n in images)
    # val_annotations.txt: name, wnid, then a bounding box; 50 per class; every image listed once
    assert all(len(fields) == 6 and all(f.isdigit() for f in fields[2:]) for fields in annotations)
    assert Counter(fields[1] for fields in annotations) == {w: 50 for w in wnids}
    assert sorted(TOP + "val/images/" + fields[0] for fields in annotations) == \
        sorted(n for n in names if n.startswith(TOP + "val/images/"))
    assert len([n for n in names if n.startswith(TOP + "test/images/test_")]) == 100
    assert {split: modes[split, "L"] for split in ("train", "val", "test")} == synthetic.GRAYSCALE
    assert modes["train", "RGB"] + modes["train", "L"] == 5000 and modes["val", "RGB"] + modes["val", "L"] == 500


def test_the_parquet_files_hold_the_zip_images_with_hf_labels(synthetic_data):
    with zipfile.ZipFile(synthetic_data / synthetic.ZIP_NAME) as z:
        ann = dict(line.split("\t")[:2] for line in z.read(TOP + "val/val_annotations.txt").decode().splitlines())
        jpegs = {n.rsplit("/", 1)[1]: z.read(n) for n in z.namelist() if n.endswith(".JPEG") and "/test/" not in n}
    layout = parquet_layout(synthetic_data / synthetic.PARQUET_DIR)
    for split, count in (("train", 5000), ("valid", 500)):
        image_type, label_type, classes, rows = layout[split]
        assert image_type == "struct<bytes: binary, path: string>" and label_type == "int64"
        names = classes["names"]
        assert classes["_type"] == "ClassLabel" and len(names) == 200 and names == sorted(names)
        assert len(rows) == count
        for row in rows:
            path = row["image"]["path"]
            wnid = ann[path] if split == "valid" else path.split("_")[0]
            assert row["image"]["bytes"] == jpegs[path] and names[row["label"]] == wnid


def test_the_classes_differ_in_content(synthetic_data):
    """A nearest-class-mean rule on 8x8 thumbnails tells the val images apart far above chance (0.1): the training
    tests have something to learn."""
    with zipfile.ZipFile(synthetic_data / synthetic.ZIP_NAME) as z:
        def thumb(name):
            return np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB").resize((8, 8)), np.float32).ravel()

        train = [(thumb(n), synthetic.WNIDS.index(n.split("/")[2])) for n in z.namelist()
                 if "/train/" in n and n.endswith(".JPEG") and int(n.rsplit("_", 1)[1][:-5]) < 100]
        ann = [line.split("\t")[:2] for line in z.read(TOP + "val/val_annotations.txt").decode().splitlines()]
        val = [(thumb(TOP + "val/images/" + name), synthetic.WNIDS.index(wnid)) for name, wnid in ann]
    x, y = np.stack([f for f, _ in train]), np.array([c for _, c in train])
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    xv, yv = np.stack([f for f, _ in val]), np.array([c for _, c in val])
    predicted = ((xv[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == yv).mean() > 0.5


@pytest.mark.real_data
def test_the_synthetic_sample_has_the_structure_of_the_real_one(sample_data, synthetic_data):
    """Same wnids.txt, member names (but for the val and test numbers), counts, grayscale counts and parquet schema:
    the tests that run on either see the same shapes."""
    def shape(names):
        return Counter(n.rsplit("/", 1)[0] + ("/*.JPEG" if n.endswith(".JPEG") else "") for n in names)

    real, fake = (official_layout(d / synthetic.ZIP_NAME) for d in (sample_data, synthetic_data))
    assert real[1] == fake[1]                                   # wnids.txt, byte for byte
    assert shape(real[0]) == shape(fake[0])
    assert {n for n in real[0] if "/train/" in n} == {n for n in fake[0] if "/train/" in n}
    assert all(fake[2][w] == real[2][w] for w in synthetic.WNIDS)
    assert Counter(f[1] for f in real[3]) == Counter(f[1] for f in fake[3])
    assert real[4] == fake[4]                                   # the same JPEG counts, grayscale and RGB, per split
    real_pq, fake_pq = (parquet_layout(d / synthetic.PARQUET_DIR) for d in (sample_data, synthetic_data))
    for split in ("train", "valid"):
        assert real_pq[split][:2] == fake_pq[split][:2]             # column types
        assert real_pq[split][2]["_type"] == fake_pq[split][2]["_type"] and len(real_pq[split][2]["names"]) == 200
        assert len(real_pq[split][3]) == len(fake_pq[split][3])
    # the train rows in the same order, naming the same classes (through each file's own 200 names)
    real_rows, fake_rows = ([(r["image"]["path"], layout["train"][2]["names"][r["label"]]) for r in layout["train"][3]]
                            for layout in (real_pq, fake_pq))
    assert real_rows == fake_rows
