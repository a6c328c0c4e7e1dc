"""tinycnn-prepare: checks on the sample (conftest's fixtures: the real one, else its synthetic stand-in), synthetic
bad inputs, download."""
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

import tinycnn
from tinycnn.prepare import PrepareError, download, ensure_prepared, is_prepared, main, prepare
from tinycnn.prepare.scan import check_jpeg

REPO = Path(__file__).resolve().parents[1]
TOP = "tiny-imagenet-200/"


# ---------------------------------------------------------------------------------------------
# helpers


def read_split(folder, split):
    """Raw samples of a split, through plain webdataset, in shard order."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    urls = [str(Path(folder) / s["file"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def key_map(folder):
    """{key: (split, label, wnid)} over all splits of a prepared folder (the wnid from the manifest's classes)."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    wnids = [c["wnid"] for c in manifest["classes"]]
    out = {}
    for split in manifest["splits"]:
        for s in read_split(folder, split):
            assert s["__key__"] not in out, f"{s['__key__']} written twice"
            assert {k for k in s if not k.startswith("__")} == {"cls", "jpg"}  # no .wnid: the manifest has it
            label = int(s["cls"])
            out[s["__key__"]] = (split, label, wnids[label] if label >= 0 else "")
    return out


def tar_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.tar"))}


def leftovers(out):
    return sorted(p.name for p in Path(out).parent.iterdir() if p.name.startswith(Path(out).name))


def jpeg(color=(200, 30, 30), size=(64, 64), mode="RGB", fmt="JPEG"):
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, fmt)
    return b.getvalue()


WNIDS = ["n03000000", "n01000000", "n02000000"]  # unsorted on purpose: labels follow the sorted order


def synthetic(n_train=6, n_val=2, top=TOP, n_test=0):
    """{path: bytes} in the tiny-imagenet-200 layout, every image distinct."""
    files = {top + "wnids.txt": "\n".join(WNIDS).encode(),
             top + "words.txt": b"n00000001\tentity\nn01000000\tfirst thing\nn02000000\tsecond\n"}
    ann, v = [], 0
    for c, w in enumerate(WNIDS):
        for i in range(n_train):
            files[f"{top}train/{w}/images/{w}_{i}.JPEG"] = jpeg((40 * c, 20 * i, 7))
        files[f"{top}train/{w}/{w}_boxes.txt"] = b""
        for _ in range(n_val):
            files[f"{top}val/images/val_{v}.JPEG"] = jpeg((7, 40 * c, 20 * v))
            ann.append(f"val_{v}.JPEG\t{w}\t0\t0\t63\t63")
            v += 1
    files[top + "val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    for t in range(n_test):
        files[f"{top}test/images/test_{t}.JPEG"] = jpeg((9, 9, 20 * t))
    return files


def write_zip(files, path):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def write_dir(files, root):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def quick(source, out, **kw):
    return prepare(source, out, holdout_per_class=kw.pop("holdout_per_class", 2), progress=False, **kw)


def bad_case(tmp_path, files, skip_bad=False):
    out = tmp_path / "out"
    return quick(write_zip(files, tmp_path / "src.zip"), out, skip_bad=skip_bad), out


# ---------------------------------------------------------------------------------------------
# the sample (10 classes, 500 train + 50 val images each; the synthetic one has the real one's counts)


@pytest.fixture(scope="session")
def truth(sample_zip):
    """{key: (official split, wnid, bytes)} straight from the zip, independently of tinycnn.prepare."""
    with zipfile.ZipFile(sample_zip) as z:
        ann = {}
        for line in z.read(TOP + "val/val_annotations.txt").decode().splitlines():
            if line.strip():
                name, wnid = line.split("\t")[:2]
                ann[Path(name).stem] = wnid
        out = {}
        for name in z.namelist():
            parts = name.split("/")
            if name.endswith(".JPEG") and parts[1] == "train":
                out[Path(name).stem] = ("train", parts[2], z.read(name))
            elif name.endswith(".JPEG") and parts[1] == "val":
                out[Path(name).stem] = ("val", ann[Path(name).stem], z.read(name))
        wnids = sorted(z.read(TOP + "wnids.txt").decode().split())
    return out, wnids


@pytest.fixture(scope="module")
def shard_samples(sample_shards):
    return {split: read_split(sample_shards, split) for split in ("train", "val", "test")}


def test_sample_manifest(sample_shards, sample_zip, truth):
    _, wnids = truth
    m = json.loads((sample_shards / "manifest.json").read_text())
    assert m["format"] == "tinycnn-shards" and m["format_version"] == 2  # 2: no .wnid member, source fingerprint
    assert m["tinycnn_version"] == tinycnn.__version__
    assert m["source"]["kind"] == "zip" and m["seed"] == 0 and m["holdout_per_class"] == 50
    assert m["source"]["path"] == str(sample_zip.resolve()) and m["source"]["size"] == sample_zip.stat().st_size
    assert m["source"]["fingerprint"].startswith("sha256:") and m["compress"] is False
    assert m["num_classes"] == 10 and m["input_shape"] == [3, 64, 64]
    assert [c["wnid"] for c in m["classes"]] == wnids
    assert {c["wnid"]: c["name"] for c in m["classes"]}["n02124075"] == "Egyptian cat"  # from words.txt
    assert m["skipped"] == []
    expect = {"train": (4500, 450, 64), "val": (500, 50, 16), "test": (500, 50, 16)}
    assert set(m["splits"]) == set(expect)
    for split, (n, per_class, n_shards) in expect.items():
        s = m["splits"][split]
        assert s["num_samples"] == n and s["class_counts"] == [per_class] * 10
        sizes = [x["num_samples"] for x in s["shards"]]
        assert len(sizes) == n_shards and sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert [x["file"] for x in s["shards"]] == [f"{split}-{i:05d}.tar" for i in range(n_shards)]
    # the sample's 68 grayscale train JPEGs are all in train or val
    assert m["splits"]["train"]["grayscale"] + m["splits"]["val"]["grayscale"] == 68
    info = json.loads((sample_shards / "_info.json").read_text())
    for split, s in m["splits"].items():
        assert info["splits"][split] == {"name": split, "num_samples": s["num_samples"],
                                         "filenames": [x["file"] for x in s["shards"]],
                                         "shard_lengths": [x["num_samples"] for x in s["shards"]]}
    assert sorted(p.name for p in sample_shards.iterdir()) == sorted(
        ["manifest.json", "_info.json"] + [x["file"] for s in m["splits"].values() for x in s["shards"]])


def test_sample_labels_keys_and_bytes(sample_shards, shard_samples, truth):
    source, wnids = truth
    m = json.loads((sample_shards / "manifest.json").read_text())
    seen = Counter()
    for split, samples in shard_samples.items():
        assert len(samples) == m["splits"][split]["num_samples"]
        counts = Counter()
        for s in samples:
            key = s["__key__"]
            official, wnid, data = source[key]
            assert official == ("val" if split == "test" else "train"), key
            if official == "train":
                assert key.startswith(wnid + "_")
            assert "wnid" not in s and m["classes"][int(s["cls"])]["wnid"] == wnid  # the manifest has the wnids
            assert int(s["cls"]) == wnids.index(wnid)
            assert s["jpg"] == data  # original bytes, no re-encode
            counts[int(s["cls"])] += 1
            seen[key] += 1
        assert [counts[i] for i in range(10)] == m["splits"][split]["class_counts"]
    # nothing lost, nothing twice
    assert set(seen) == set(source) and max(seen.values()) == 1


def test_sample_images_decode_to_3x64x64(sample_shards, shard_samples):
    m = json.loads((sample_shards / "manifest.json").read_text())
    for split, samples in shard_samples.items():
        gray = 0
        for s in samples:
            data = torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8)
            assert decode_jpeg(data, mode=ImageReadMode.RGB).shape == (3, 64, 64)
            gray += decode_jpeg(data, mode=ImageReadMode.UNCHANGED).shape[0] == 1
        assert gray == m["splits"][split]["grayscale"]


def test_sample_shards_are_shuffled(shard_samples):
    train = shard_samples["train"]
    keys = [s["__key__"] for s in train]
    assert keys != sorted(keys)
    first_shard_classes = {int(s["cls"]) for s in train[:70]}
    assert len(first_shard_classes) >= 8, "a shard should mix the classes"


def test_timm_wds_reader_reads_the_shards(sample_shards):
    timm_data = pytest.importorskip("timm.data")
    ds = timm_data.create_dataset("wds/tiny", root=str(sample_shards), split="test")
    assert len(ds) == 500
    targets = Counter()
    for img, target in ds:
        assert img.size == (64, 64) and img.mode == "RGB"
        targets[target] += 1
    assert targets == Counter({i: 50 for i in range(10)})


def test_rerun_is_a_noop(sample_zip, sample_shards):
    before = {p.name: p.stat().st_mtime_ns for p in sample_shards.iterdir()}
    m = prepare(sample_zip, sample_shards, progress=False)
    assert m == json.loads((sample_shards / "manifest.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in sample_shards.iterdir()} == before
    with pytest.raises(PrepareError, match="other settings.*--force"):
        prepare(sample_zip, sample_shards, holdout_per_class=0, progress=False)


@pytest.mark.slow
def test_extracted_folder_gives_the_same_shards(sample_zip, sample_shards, tmp_path):
    with zipfile.ZipFile(sample_zip) as z:
        z.extractall(tmp_path / "src")
    # both spellings: the folder holding wnids.txt, and its parent
    for source in (tmp_path / "src", tmp_path / "src" / "tiny-imagenet-200"):
        out = tmp_path / f"out-{source.name}"
        assert prepare(source, out, progress=False)["source"]["kind"] == "folder"
        assert tar_bytes(out) == tar_bytes(sample_shards)


def test_parquet_gives_the_same_samples(sample_parquet, sample_shards, tmp_path):
    m = prepare(sample_parquet, tmp_path / "out", progress=False)
    zm = json.loads((sample_shards / "manifest.json").read_text())
    assert m["source"]["kind"] == "parquet"
    assert [c["wnid"] for c in m["classes"]] == [c["wnid"] for c in zm["classes"]]  # 0..9, not the 200-name index
    assert {k: v["class_counts"] for k, v in m["splits"].items()} == \
        {k: v["class_counts"] for k, v in zm["splits"].items()}
    assert key_map(tmp_path / "out") == key_map(sample_shards)
    # same keys and labels sorted the same way: byte-identical shards
    assert tar_bytes(tmp_path / "out") == tar_bytes(sample_shards)


@pytest.fixture(scope="module")
def truncated_zip(sample_zip, tmp_path_factory):
    """A copy of the sample zip with one train JPEG cut in half."""
    victim = TOP + "train/n02124075/images/n02124075_7.JPEG"
    path = tmp_path_factory.mktemp("truncated") / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(sample_zip) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[: len(data) // 2] if info.filename == victim else data)
    return path, victim


def test_truncated_jpeg_is_refused(truncated_zip, tmp_path):
    path, victim = truncated_zip
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="n02124075_7.JPEG: truncated") as e:
        prepare(path, out, progress=False)
    assert victim in str(e.value) and "--skip-bad" in str(e.value)
    assert not out.exists() and leftovers(out) == []  # no manifest, no temporary folder


def test_truncated_jpeg_is_skipped_and_recorded(truncated_zip, tmp_path):
    path, victim = truncated_zip
    m = prepare(path, tmp_path / "out", skip_bad=True, progress=False)
    assert [s["file"] for s in m["skipped"]] == [victim] and "truncated" in m["skipped"][0]["reason"]
    keys = key_map(tmp_path / "out")
    assert "n02124075_7" not in keys and len(keys) == 5499
    label = [c["wnid"] for c in m["classes"]].index("n02124075")
    assert m["splits"]["train"]["class_counts"][label] == 449 and m["splits"]["val"]["class_counts"][label] == 50


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tinycnn.prepare", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_cli_holdout_0(sample_zip, truth, tmp_path):
    source, wnids = truth
    out = tmp_path / "out"
    assert main([str(sample_zip), "--out", str(out), "--holdout", "0", "--num-shards", "train=5,val=3",
                 "--workers", "1", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["holdout_per_class"] == 0 and set(m["splits"]) == {"train", "val"}
    assert [len(m["splits"][s]["shards"]) for s in ("train", "val")] == [5, 3]
    keys = key_map(out)
    assert {k for k, v in keys.items() if v[0] == "train"} == {k for k, v in source.items() if v[0] == "train"}
    assert {k for k, v in keys.items() if v[0] == "val"} == {k for k, v in source.items() if v[0] == "val"}
    assert all(label == wnids.index(source[k][1]) for k, (_, label, _) in keys.items())


def test_cli_missing_source_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.zip"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "source not found" in err and "nope.zip" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_help_explains_everything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--holdout", "--seed", "--num-shards", "--skip-bad", "--force", "--workers",
                 "--include-unlabeled", "--compress", "--url", "--hf", "--md5", "--sha256", "--no-verify", "examples:"):
        assert flag in text


def test_cli_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--num-shards", "train=x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--url", "http://x/y.zip"])  # download flags without 'download'
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# synthetic sources


def test_synthetic_zip_labels_and_splits(tmp_path):
    m, out = bad_case(tmp_path, synthetic())
    assert [c["wnid"] for c in m["classes"]] == sorted(WNIDS)
    assert [c["name"] for c in m["classes"]] == ["first thing", "second", "n03000000"]  # unnamed: its wnid
    keys = key_map(out)
    for key, (split, label, wnid) in keys.items():
        assert wnid == sorted(WNIDS)[label]
        assert split == ("test" if key.startswith("val_") else ("train", "val")[split == "val"])
    assert m["splits"]["val"]["class_counts"] == [2, 2, 2] and m["splits"]["train"]["class_counts"] == [4, 4, 4]
    # never more shards than samples (defaults are 64 / 16)
    assert [len(m["splits"][s]["shards"]) for s in ("train", "val", "test")] == [12, 6, 6]


def test_holdout_is_seeded(tmp_path):
    src = write_zip(synthetic(n_train=20), tmp_path / "src.zip")
    val = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(val)}-{seed}"
        quick(src, out, seed=seed, holdout_per_class=5)
        val.setdefault(seed, []).append(sorted(k for k, v in key_map(out).items() if v[0] == "val"))
    assert val[0][0] == val[0][1] and val[0][0] != val[1][0]


def test_num_shards_spreads_samples_evenly(tmp_path):
    m = quick(write_zip(synthetic(), tmp_path / "src.zip"), tmp_path / "out", num_shards={"train": 5, "val": 1})
    assert [s["num_samples"] for s in m["splits"]["train"]["shards"]] == [2, 2, 3, 2, 3]
    assert len(m["splits"]["val"]["shards"]) == 1 and len(m["splits"]["test"]["shards"]) == 6
    with pytest.raises(PrepareError, match="unknown split"):
        quick(tmp_path / "src.zip", tmp_path / "out2", num_shards={"training": 5})


def test_no_top_folder_and_messy_wnids(tmp_path):
    files = synthetic(top="")
    files["wnids.txt"] = b"\xef\xbb\xbf\r\n" + "\r\n".join(WNIDS).encode() + b"\r\n\r\n"  # BOM, CRLF, blanks
    m, _ = bad_case(tmp_path, files)
    assert [c["wnid"] for c in m["classes"]] == sorted(WNIDS)


def test_unlabeled_test_images_on_request(tmp_path):
    src = write_zip(synthetic(n_test=3), tmp_path / "src.zip")
    assert "unlabeled" not in quick(src, tmp_path / "a")["splits"]
    m = quick(src, tmp_path / "b", include_unlabeled=True)
    samples = read_split(tmp_path / "b", "unlabeled")
    assert m["splits"]["unlabeled"]["num_samples"] == 3
    assert sorted(s["__key__"] for s in samples) == ["test_0", "test_1", "test_2"]
    assert {s["cls"] for s in samples} == {b"-1"} and not any("wnid" in s for s in samples)


@pytest.mark.parametrize("case, reason", [
    ("small", "image is 64x32, expected 64x64"),
    ("png", "not a JPEG"),
    ("truncated", "truncated JPEG"),
    ("unknown_wnid", "unknown wnid n09999999"),
    ("duplicate", "duplicate key n01000000_0"),
    ("unlabeled_val", "no label in val/val_annotations.txt"),
])
def test_bad_image_refused_then_skipped(tmp_path, case, reason):
    files = synthetic()
    bad = TOP + "train/n01000000/images/n01000000_1.JPEG"
    if case == "small":
        files[bad] = jpeg(size=(64, 32))
    elif case == "png":
        files[bad] = jpeg(fmt="PNG")
    elif case == "truncated":
        files[bad] = files[bad][:-1]
    elif case == "unknown_wnid":
        bad = TOP + "val/images/val_0.JPEG"
        ann = files[TOP + "val/val_annotations.txt"].decode().replace("val_0.JPEG\tn03000000", "val_0.JPEG\tn09999999")
        files[TOP + "val/val_annotations.txt"] = ann.encode()
    elif case == "duplicate":
        bad = TOP + "train/n02000000/images/n01000000_0.JPEG"  # same stem in another class folder
        files[bad] = jpeg((1, 2, 3))
    elif case == "unlabeled_val":
        bad = TOP + "val/images/val_99.JPEG"
        files[bad] = jpeg()
    with pytest.raises(PrepareError) as e:
        bad_case(tmp_path, files)
    assert f"{bad}: {reason}" in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []

    m, out = bad_case(tmp_path, files, skip_bad=True)
    assert len(m["skipped"]) == 1 and m["skipped"][0]["file"] == bad and reason in m["skipped"][0]["reason"]
    keys = key_map(out)
    assert sum(s["num_samples"] for s in m["splits"].values()) == len(keys)
    if case == "duplicate":  # the first one stays, with its own label
        assert keys["n01000000_0"][2] == "n01000000"
    else:
        assert Path(bad).stem not in keys


def test_annotation_without_image_is_refused(tmp_path):
    files = synthetic()
    del files[TOP + "val/images/val_3.JPEG"]
    with pytest.raises(PrepareError, match="val_3.JPEG: listed in .*val_annotations.txt but missing"):
        bad_case(tmp_path, files)
    m, _ = bad_case(tmp_path, files, skip_bad=True)
    assert [s["file"] for s in m["skipped"]] == [TOP + "val/images/val_3.JPEG"]


def test_corrupt_zips(tmp_path):
    (tmp_path / "garbage.zip").write_bytes(b"this is not a zip" * 100)
    good = write_zip(synthetic(), tmp_path / "good.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])  # an interrupted download
    for name in ("garbage.zip", "cut.zip"):
        with pytest.raises(PrepareError, match=f"{name}: not a readable zip"):
            quick(tmp_path / name, tmp_path / "out", skip_bad=True)
        assert not (tmp_path / "out").exists()


def test_zip_member_with_bad_crc(tmp_path):
    files = synthetic()
    victim = TOP + "train/n02000000/images/n02000000_2.JPEG"
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    raw = bytearray(path.read_bytes())
    at = raw.find(files[victim]) + 300
    raw[at] ^= 0xFF  # flip a byte inside the stored JPEG: its CRC no longer matches
    path.write_bytes(raw)
    with pytest.raises(PrepareError, match=f"{victim}: cannot read it"):
        quick(path, tmp_path / "out")
    m = quick(path, tmp_path / "out", skip_bad=True)
    assert [s["file"] for s in m["skipped"]] == [victim]


def test_bad_sources(tmp_path):
    with pytest.raises(PrepareError, match="source not found"):
        quick(tmp_path / "missing.zip", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="neither the tiny-imagenet-200 layout"):
        quick(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "x.tar").write_bytes(b"x")
    with pytest.raises(PrepareError, match="unsupported source"):
        quick(tmp_path / "x.tar", tmp_path / "out")
    files = synthetic()
    del files[TOP + "wnids.txt"]
    with pytest.raises(PrepareError, match="no wnids.txt"):
        bad_case(tmp_path, files)
    # too few images to hold out
    with pytest.raises(PrepareError, match="too few to hold out 6"):
        quick(write_zip(synthetic(), tmp_path / "s.zip"), tmp_path / "out", holdout_per_class=6)


def test_output_folder_safety_and_force(tmp_path):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        quick(src, out, force=True)
    assert (out / "README.md").read_text() == "mine"  # never deleted

    out = tmp_path / "out2"
    quick(src, out)
    manifest = (out / "manifest.json").stat().st_mtime_ns
    quick(src, out)  # no-op
    assert (out / "manifest.json").stat().st_mtime_ns == manifest
    m = quick(src, out, force=True, holdout_per_class=0)
    assert m["holdout_per_class"] == 0 and set(m["splits"]) == {"train", "val"}
    assert not list(out.glob("test-*.tar")) and leftovers(out) == ["out2"]
    # a folder of ours that lost a shard is not complete: rebuilt without --force
    (out / "train-00000.tar").unlink()
    assert not is_prepared(out)
    quick(src, out, holdout_per_class=0)
    assert is_prepared(out)


def test_parquet_without_paths_and_without_pyarrow(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    names = ["n00000000"] + sorted(WNIDS) + ["n09000000"]  # the HF list holds more classes than present
    meta = {"huggingface": json.dumps({"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}})}

    def table(labels):
        images = [{"bytes": jpeg((9 * i, 3, 3)), "path": None} for i in range(len(labels))]
        return pa.table({"image": images, "label": labels}).replace_schema_metadata(meta)

    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table([1, 2, 3] * 4), tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table([3, 2, 1]), tmp_path / "hf" / "data" / "valid-00000-of-00001.parquet")
    m = quick(tmp_path / "hf", tmp_path / "out", holdout_per_class=1)
    assert [c["wnid"] for c in m["classes"]] == sorted(WNIDS)  # labels 0..2, not 1..3
    keys = key_map(tmp_path / "out")
    assert sorted(k for k, v in keys.items() if v[0] == "test") == ["valid_0", "valid_1", "valid_2"]
    assert keys["valid_0"][1:] == (2, sorted(WNIDS)[2]) and keys["train_0"][1:] == (0, sorted(WNIDS)[0])

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PrepareError, match=r'pip install "tinycnn\[parquet\]"'):
        quick(tmp_path / "hf", tmp_path / "out2")


def test_check_jpeg_catches_truncation():
    data = jpeg((10, 200, 90))
    assert check_jpeg(data) == 3 and check_jpeg(jpeg(0, mode="L")) == 1
    for cut in (len(data) // 2, len(data) - 1, len(data) - 2, 300):
        assert "truncated" in check_jpeg(data[:cut])
    assert "does not decode" in check_jpeg(data[:2] + b"\0" * 200 + b"\xff\xd9")


# ---------------------------------------------------------------------------------------------
# download


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, *args, server_state, **kw):
        self.state = server_state
        super().__init__(*args, **kw)

    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.state
        data = st["files"].get(self.path)
        st["requests"].append(self.headers.get("Range"))
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and st["ranges"]:
            start, status = int(rng.split("=")[1].rstrip("-")), 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = st.get("cut")
        self.wfile.write(body[:cut] if cut is not None else body)  # cut: the connection drops mid-file
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def server():
    state = {"files": {}, "requests": [], "ranges": True, "cut": None}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, server_state=state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def small_zip(tmp_path):
    data = write_zip(synthetic(), tmp_path / "made.zip").read_bytes()
    return data, hashlib.md5(data).hexdigest()


def test_download_resumes_after_a_dropped_connection(server, small_zip, tmp_path):
    data, md5 = small_zip
    server["files"]["/tiny-imagenet-200.zip"] = data
    url = server["url"] + "/tiny-imagenet-200.zip"
    server["cut"] = len(data) // 3
    with pytest.raises(PrepareError, match="interrupted.*run the same command again"):
        download(tmp_path / "dl", url, md5, progress=False)
    part = tmp_path / "dl" / "tiny-imagenet-200.zip.part"
    assert part.stat().st_size == len(data) // 3 and not (tmp_path / "dl" / "tiny-imagenet-200.zip").exists()

    server["cut"] = None
    path = download(tmp_path / "dl", url, md5, progress=False)
    assert server["requests"] == [None, f"bytes={len(data) // 3}-"]
    assert path == tmp_path / "dl" / "tiny-imagenet-200.zip" and path.read_bytes() == data and not part.exists()
    # a verified file is reused without a request
    assert download(tmp_path / "dl", url, md5, progress=False) == path and len(server["requests"]) == 2


def test_download_restarts_when_the_server_ignores_range(server, small_zip, tmp_path):
    data, md5 = small_zip
    server["files"]["/t.zip"], server["ranges"] = data, False
    (tmp_path / "t.zip.part").write_bytes(b"stale bytes")
    path = download(tmp_path, server["url"] + "/t.zip", md5, progress=False)
    assert server["requests"] == ["bytes=11-"] and path.read_bytes() == data


def test_download_checksum_mismatch(server, small_zip, tmp_path):
    data, _ = small_zip
    server["files"]["/t.zip"] = data
    dl = tmp_path / "dl"
    with pytest.raises(PrepareError, match="checksum mismatch.*md5"):
        download(dl, server["url"] + "/t.zip", "0" * 32, progress=False)
    assert list(dl.iterdir()) == []  # no corrupt file to resume from
    with pytest.raises(PrepareError, match="checksum mismatch.*sha256"):
        download(dl, server["url"] + "/t.zip", None, sha256="0" * 64, progress=False)
    with pytest.raises(PrepareError, match="HTTP 404"):
        download(dl, server["url"] + "/other.zip", None, progress=False)
    assert download(dl, server["url"] + "/t.zip", None, sha256=hashlib.sha256(data).hexdigest(),
                    progress=False).read_bytes() == data


def test_download_offline_fails_fast_with_a_hint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(PrepareError, match=r"cannot reach .*tinycnn-prepare /path/to/tiny-imagenet-200.zip --out"):
        download(tmp_path, f"http://127.0.0.1:{port}/tiny-imagenet-200.zip", progress=False)
    assert time.monotonic() - started < 5


def test_cli_download_then_prepare(server, small_zip, tmp_path):
    data, md5 = small_zip
    server["files"]["/tiny-imagenet-200.zip"] = data
    out = tmp_path / "shards" / "tiny"
    args = ["download", "--url", server["url"] + "/tiny-imagenet-200.zip", "--out", str(out), "--holdout", "2",
            "--no-progress"]
    assert main(args + ["--md5", "0" * 32]) == 2 and not out.exists()
    assert main(args + ["--md5", md5]) == 0
    assert is_prepared(out) and (tmp_path / "shards" / "downloads" / "tiny-imagenet-200.zip").read_bytes() == data
    (tmp_path / "shards" / "downloads" / "tiny-imagenet-200.zip").unlink()
    assert main(args + ["--md5", md5]) == 0  # already prepared: a no-op, nothing downloaded
    assert server["requests"] == [None, None]  # the bad-md5 try and the good one


def test_cli_download_hf(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot(repo_id, repo_type, local_dir, **kw):
        calls.append((repo_id, repo_type))
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot)
    assert main(["download", "--hf", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert calls == [("zh-plus/tiny-imagenet", "dataset")]

    src = write_dir(synthetic(), tmp_path / "fetched")  # stands in for the downloaded files
    monkeypatch.setattr(hub, "snapshot_download", lambda **kw: str(src))
    assert main(["download", "--hf", "--out", str(tmp_path / "out"), "--holdout", "2", "--no-progress"]) == 0
    assert is_prepared(tmp_path / "out")


def test_ensure_prepared(server, small_zip, tmp_path, capsys):
    data, md5 = small_zip
    out = tmp_path / "data" / "tiny"
    with pytest.raises(PrepareError, match="tinycnn-prepare /path/to/tiny-imagenet-200.zip --out"):
        ensure_prepared(out, download=False)
    server["files"]["/z.zip"] = data
    assert ensure_prepared(out, download=True, url=server["url"] + "/z.zip", md5=md5, holdout_per_class=2,
                           progress=False) == out
    said = " ".join(capsys.readouterr().err.split())  # before it starts: what, how big, where
    assert f"downloading {server['url']}/z.zip (the official zip is ~248 MB) into {tmp_path / 'data' / 'downloads'}" \
        f", then writing shards to {out}" in said
    assert is_prepared(out) and (tmp_path / "data" / "downloads" / "z.zip").is_file()
    assert ensure_prepared(out, download=False) == out  # already there: no download, no work
    assert len(server["requests"]) == 1

    other = tmp_path / "other"
    assert ensure_prepared(other, source=tmp_path / "data" / "downloads" / "z.zip", download=False,
                           holdout_per_class=2, progress=False) == other
    assert tar_bytes(other) == tar_bytes(out)


# ---------------------------------------------------------------------------------------------
# compressed shards


def jpeg_bytes(samples):
    return sum(len(s["jpg"]) for split in samples.values() for s in split)


def test_compressed_shards_hold_the_same_samples(sample_zip, sample_shards, shard_samples, tmp_path):
    out = tmp_path / "gz"
    assert main([str(sample_zip), "--out", str(out), "--compress", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["compress"] is True
    for split, s in m["splits"].items():
        assert [x["file"] for x in s["shards"]] == [f"{split}-{i:05d}.tar.gz" for i in range(len(s["shards"]))]
        # plain webdataset reads them as they are, sample for sample the same as the plain shards
        assert [(x["__key__"], x["cls"], x["jpg"]) for x in read_split(out, split)] == \
            [(x["__key__"], x["cls"], x["jpg"]) for x in shard_samples[split]]
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["test"]["filenames"] == [x["file"] for x in m["splits"]["test"]["shards"]]
    # the bytes a remote reader pays for: goal: at most 1.15x the JPEG bytes (plain shards: 512-byte headers)
    jpegs = jpeg_bytes(shard_samples)
    plain = sum(p.stat().st_size for p in sample_shards.glob("*.tar"))
    packed = sum(p.stat().st_size for p in out.glob("*.tar.gz"))
    assert packed < 1.15 * jpegs and plain < 2.0 * jpegs
    # the same settings again: a no-op; other compression: refused without --force
    assert main([str(sample_zip), "--out", str(out), "--compress", "--no-progress"]) == 0
    with pytest.raises(PrepareError, match=r"other settings: compress True \(asked False\)"):
        prepare(sample_zip, out, progress=False)


def test_timm_and_the_loader_read_compressed_shards(sample_zip, tmp_path):
    timm_data = pytest.importorskip("timm.data")
    from tinycnn.data import build_loader
    out = tmp_path / "gz"
    prepare(sample_zip, out, compress=True, progress=False)
    ds = timm_data.create_dataset("wds/tiny", root=str(out), split="test")
    targets = Counter(target for img, target in ds)
    assert targets == Counter({i: 50 for i in range(10)})
    loader = build_loader(out, "test", batch_size=128, train=False, num_workers=0)
    labels = torch.cat([y for x, y in loader])
    assert Counter(labels.tolist()) == targets


# ---------------------------------------------------------------------------------------------
# provenance: what the shards were made from


def test_manifest_fingerprints_zip_and_folder_sources(tmp_path):
    files = synthetic()
    zm = quick(write_zip(files, tmp_path / "src.zip"), tmp_path / "a")
    fm = quick(write_dir(files, tmp_path / "src"), tmp_path / "b")
    assert zm["source"]["size"] == (tmp_path / "src.zip").stat().st_size
    assert fm["source"]["size"] == sum(len(v) for v in files.values())
    assert zm["source"]["fingerprint"] != fm["source"]["fingerprint"]
    (tmp_path / "src" / TOP / "val" / "images" / "extra.JPEG").write_bytes(b"x")  # a folder that changed
    with pytest.raises(PrepareError, match="already prepared, made from .*src .*other content"):
        quick(tmp_path / "src", tmp_path / "b")


def test_ensure_prepared_checks_the_source(tmp_path, recwarn):
    src = write_zip(synthetic(), tmp_path / "a.zip")
    other = write_zip(synthetic(n_train=5), tmp_path / "b.zip")
    out = tmp_path / "shards"
    quick(src, out)
    assert ensure_prepared(out, source=src) == out
    moved = tmp_path / "moved.zip"
    moved.write_bytes(src.read_bytes())
    assert ensure_prepared(out, source=moved) == out  # same content elsewhere: the same data
    with pytest.raises(PrepareError) as e:
        ensure_prepared(out, source=other)
    msg = str(e.value)
    assert str(src) in msg and str(other) in msg and "\n" not in msg
    assert f"tinycnn-prepare {other} --out {out} --force" in msg and "--data" in msg
    # prepare says the same to a user who runs it without --force, and rebuilds with it
    with pytest.raises(PrepareError, match=f"made from {src}.*not from {other}.*--force"):
        quick(other, out)
    src.unlink()  # the source deleted after preparing: the shards are still what they are
    assert ensure_prepared(out, source=src) == out
    with pytest.raises(PrepareError, match="does not exist"):
        ensure_prepared(out, source=tmp_path / "typo.zip")
    assert not recwarn.list


def test_shards_without_fingerprint_are_compared_by_path(tmp_path):
    src = write_zip(synthetic(), tmp_path / "a.zip")
    out = tmp_path / "shards"
    quick(src, out)
    m = json.loads((out / "manifest.json").read_text())
    m["source"] = {"kind": "zip", "path": str(src)}  # as tinycnn-prepare wrote it before fingerprints
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="no source fingerprint.*by path"):
        assert ensure_prepared(out, source=src) == out
    copy = tmp_path / "copy.zip"
    copy.write_bytes(src.read_bytes())
    with pytest.raises(PrepareError, match="compared by path: these shards record no fingerprint"):
        ensure_prepared(out, source=copy)
    del m["source"]  # a manifest written by hand: nothing to compare, said as a warning
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="checked by path only"):
        assert ensure_prepared(out, source=copy) == out


def test_ensure_prepared_missing_or_empty_folder(tmp_path):
    out = tmp_path / "shards" / "tiny"
    with pytest.raises(PrepareError, match=f"{out} does not exist; prepare it first: "
                                           f"tinycnn-prepare /path/to/tiny-imagenet-200.zip --out {out}"):
        ensure_prepared(out)
    out.mkdir(parents=True)
    with pytest.raises(PrepareError, match=f"{out} is empty; prepare it first"):
        ensure_prepared(out)
    (out / "notes.txt").write_text("x")
    with pytest.raises(PrepareError, match=f"{out} holds no prepared dataset"):
        ensure_prepared(out)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["tiny"]  # nothing downloaded


# ---------------------------------------------------------------------------------------------
# the unlabeled images' one name, and its old CLI spelling


@pytest.mark.parametrize("flag", ["--include-unlabeled", "--include-unlabeled-test"])
def test_cli_include_unlabeled(tmp_path, flag):
    src = write_zip(synthetic(n_test=2), tmp_path / "src.zip")
    assert main([str(src), "--out", str(tmp_path / "out"), "--holdout", "2", "--no-progress", flag]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["unlabeled"]["num_samples"] == 2


# ---------------------------------------------------------------------------------------------
# killed, interrupted, concurrent


def _proc_state(pid):
    """(state, parent pid) from /proc, or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        st = _proc_state(d) if d.isdigit() else None
        if st and st[1] == pid and st[0] != "Z":
            out.append(int(d))
    return out


def _gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_proc_state(p) in (None,) or _proc_state(p)[0] == "Z" for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def stalled_prepare(tmp_path):
    """A `tinycnn-prepare` with its worker pool up, stuck reading a source image (a FIFO nobody writes)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc and FIFOs")
    files = synthetic()
    for w in WNIDS:  # enough images for a process pool (2,000)
        files.update({f"{TOP}train/{w}/images/{w}_x{i}.JPEG": files[f"{TOP}train/{w}/images/{w}_0.JPEG"]
                      for i in range(700)})
    src = write_dir(files, tmp_path / "src")
    os.mkfifo(src / TOP / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_zz.JPEG")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tinycnn.prepare", str(src), "--out", str(out), "--workers", "2",
                             "--holdout", "2", "--no-progress"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (len(_children(proc.pid)) >= 2 and list(tmp_path.glob("out.tmp-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # let it reach the FIFO
    workers = _children(proc.pid)
    yield proc, workers, write_zip(synthetic(), tmp_path / "good.zip"), out
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in workers:  # never leave processes behind, even when a test failed (but only ours: pids get reused)
        with contextlib.suppress(OSError):
            if b"tinycnn.prepare" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_second_prepare_stops_at_once_sigkill_leaves_no_process_and_the_next_run_cleans_up(stalled_prepare,
                                                                                           capsys):
    proc, workers, good, out = stalled_prepare
    started = time.monotonic()
    assert main([str(good), "--out", str(out), "--holdout", "2", "--no-progress"]) == 2
    assert time.monotonic() - started < 5
    err = " ".join(capsys.readouterr().err.split())
    assert f"{out} is being written by another tinycnn-prepare (pid {proc.pid})" in err
    tmp = list(out.parent.glob("out.tmp-*"))
    assert proc.poll() is None and [t.name.split("-")[1] for t in tmp] == [str(proc.pid)]  # untouched; owner's pid

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(workers), f"pool workers {workers} outlived their SIGKILLed parent"
    assert tmp[0].is_dir()  # nothing could clean up after SIGKILL...
    quick(good, out)  # ...so the next run does, and says so
    err = " ".join(capsys.readouterr().err.split())
    assert f"removed {tmp[0]}, left by process {proc.pid} that did not finish" in err
    assert leftovers(out) == ["out"] and is_prepared(out)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_clean_up(stalled_prepare, how):
    proc, workers, _, out = stalled_prepare
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:  # the terminal sends SIGINT to the whole process group, workers included
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert _gone(workers) and leftovers(out) == []  # no temporary folder, no lock file


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path, capsys):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = os.getppid()  # our parent: alive, and not us
    for name in (f"out.tmp-{dead}-0123abcd", "out.tmp-89abcdef", f"out.old-{dead}-00000000",
                 f"out.tmp-{live}-0123abcd", "out.tmp-notmine"):
        (tmp_path / name).mkdir()
    quick(src, out)
    err = " ".join(capsys.readouterr().err.split())
    assert f"left by process {dead}" in err and "out.tmp-89abcdef, left by an earlier run" in err
    assert leftovers(out) == ["out", f"out.tmp-{live}-0123abcd", "out.tmp-notmine"]


def test_unusable_out_is_one_line(tmp_path):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    (tmp_path / "file.txt").write_text("x")
    for out, why in ((tmp_path / "file.txt", "exists and is not a folder"),
                     (tmp_path / "file.txt" / "sub" / "out", "cannot create")):
        with pytest.raises(PrepareError, match=why):
            quick(src, out)
    assert (tmp_path / "file.txt").read_text() == "x"


def test_recipes_print_prepare_errors_as_one_line(tmp_path, capsys):
    from tinycnn.cli import run_main
    assert run_main(lambda: ensure_prepared(tmp_path / "nope")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: shards folder {tmp_path / 'nope'} does not exist; prepare it first" in err


def test_workers_without_pdeathsig_exit_when_orphaned():
    # the fallback where PR_SET_PDEATHSIG does not exist (macOS...): a worker B whose parent A dies
    if not hasattr(os, "fork") or not Path("/proc").is_dir():
        pytest.skip("needs fork and /proc")
    from tinycnn.prepare.scan import _exit_when_orphaned
    r, w = os.pipe()
    a = os.fork()
    if a == 0:
        try:
            parent = os.getpid()
            b = os.fork()
            if b == 0:  # B: busy for a minute, its watcher thread beside it
                os.close(w)  # the test reads up to EOF
                threading.Thread(target=_exit_when_orphaned, args=(parent, 0.05), daemon=True).start()
                time.sleep(60)
                os._exit(3)
            os.write(w, str(b).encode())
        finally:
            os._exit(0)  # A dies at once
    os.close(w)
    os.waitpid(a, 0)
    with os.fdopen(r) as f:
        child = int(f.read())
    gone = _gone([child], timeout=10)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone, f"orphaned child {child} was still running"
