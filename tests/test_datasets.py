"""Dataset loaders on tiny copies of each benchmark's real layout, written at test time."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffeat.core.datasets import (
    DatasetCard,
    ImageRef,
    LazyImages,
    Pair,
    card_of,
    description_of,
    inside_root,
    pair_images,
)
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.options import build_options
from diffeat.core.plugins import PluginManager
from diffeat.plugins.datasets.cub import CUB, CUBOptions
from diffeat.plugins.datasets.pfwillow import PFWillow, PFWillowOptions
from diffeat.plugins.datasets.spair import SPair, SPairOptions
from diffeat.plugins.datasets.synthetic import (
    Synthetic,
    apply_homography,
    assign_kind,
    make_synthetic,
    random_homography,
)
from diffeat.testing import smooth_texture

# ---------------------------------------------------------------------------- SPair-71k


def spair_pair(pid, src, trg, cat, src_kps, trg_kps, **extra):
    data = {
        "pair_id": pid,
        "src_imname": f"{src}.jpg",
        "trg_imname": f"{trg}.jpg",
        "src_imsize": [60, 40, 3],
        "trg_imsize": [50, 70, 3],
        "src_bndbox": [2, 3, 50, 35],
        "trg_bndbox": [40, 60, 5, 4],  # corners the wrong way round: normalised
        "category": cat,
        "src_pose": "Frontal",
        "trg_pose": "Left",
        "src_kps": src_kps,
        "trg_kps": trg_kps,
        "kps_ids": [str(i) for i in range(len(src_kps))],
        "mirror": 0,
        "viewpoint_variation": 1,
        "scale_variation": 0,
        "truncation": 2,
        "occlusion": 1,
    }
    data.update(extra)
    return data


def write_spair(root: Path) -> Path:
    """Two categories, three test pairs, one trn pair, in the SPair-71k layout."""
    for cat, names, sizes in [
        ("cat", ["2008_000001", "2008_000002"], [(60, 40), (50, 70)]),
        ("pottedplant", ["2009_000003", "2009_000004"], [(60, 40), (50, 70)]),
    ]:
        for name, size in zip(names, sizes):
            d = root / "JPEGImages" / cat
            d.mkdir(parents=True, exist_ok=True)
            smooth_texture(size, seed=len(name)).save(d / f"{name}.jpg")
            ann = root / "ImageAnnotation" / cat
            ann.mkdir(parents=True, exist_ok=True)
            (ann / f"{name}.json").write_text(
                json.dumps({"filename": f"{name}.jpg", "kps": {"0": [1, 2], "1": None}})
            )
    pairs = {
        "test": [
            spair_pair(
                1, "2008_000001", "2008_000002", "cat", [[10, 12], [30, 20]], [[5, 6], [40, 60]]
            ),
            spair_pair(2, "2008_000002", "2008_000001", "cat", [[1, 2]], [[3, 4]]),
            spair_pair(3, "2009_000003", "2009_000004", "pottedplant", [[7, 8]], [[9, 10]]),
        ],
        "trn": [spair_pair(4, "2008_000001", "2008_000002", "cat", [[1, 1]], [[2, 2]])],
    }
    for split, items in pairs.items():
        d = root / "PairAnnotation" / split
        d.mkdir(parents=True, exist_ok=True)
        for p in items:
            src, trg = p["src_imname"][:-4], p["trg_imname"][:-4]
            name = f"{p['pair_id']:06d}-{src}-{trg}:{p['category']}"
            (d / f"{name}.json").write_text(json.dumps(p))
    layout = root / "Layout" / "small"
    layout.mkdir(parents=True)
    (layout / "test.txt").write_text("000003-2009_000003-2009_000004:pottedplant\n")
    return root


def test_spair_reads_the_real_layout(tmp_path):
    root = write_spair(tmp_path / "SPair-71k")
    pairs = list(SPair(SPairOptions(root=str(root))).pairs())
    assert [p.id for p in pairs] == [
        "000001-2008_000001-2008_000002:cat",
        "000002-2008_000002-2008_000001:cat",
        "000003-2009_000003-2009_000004:pottedplant",
    ]
    p = pairs[0]
    assert p.category == "cat"
    assert p.source == root / "JPEGImages" / "cat" / "2008_000001.jpg" and p.source.is_file()
    assert p.source_points.tolist() == [[10, 12], [30, 20]]
    assert p.target_points.tolist() == [[5, 6], [40, 60]]
    assert p.visible.tolist() == [True, True]
    assert p.source_bbox == (2, 3, 50, 35) and p.target_bbox == (5, 4, 40, 60)
    assert p.source_size == (60, 40) and p.target_size == (50, 70)  # [w, h, c] -> (w, h)
    assert p.keypoint_ids == ["0", "1"]
    assert p.flags["viewpoint_variation"] == 1 and p.flags["truncation"] == 2
    assert p.flags["occlusion"] == 1 and p.flags["mirror"] == 0
    # the dict form round-trips
    again = Pair.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again.to_dict() == p.to_dict()


def test_spair_options(tmp_path):
    root = write_spair(tmp_path / "SPair-71k")

    def ids(**kw):
        return [p.id for p in SPair(SPairOptions(root=str(root), **kw)).pairs()]

    assert ids(split="train") == ["000004-2008_000001-2008_000002:cat"]  # alias of trn
    assert ids(categories=["pottedplant"]) == ["000003-2009_000003-2009_000004:pottedplant"]
    assert ids(pair_list="Layout/small/test.txt") == ["000003-2009_000003-2009_000004:pottedplant"]
    # SD-DINO's subsample: sorted per category, RandomState(seed).choice(n, k) with replacement
    cat_files = ids(categories=["cat"])
    draw = np.random.RandomState(7).choice(2, 3)
    sampled = ids(sample_per_category=3, sample_seed=7, categories=["cat"])
    assert sampled == [cat_files[i] for i in draw]
    assert len(ids(sample_per_category=2)) == 4


def test_spair_errors_name_whats_missing(tmp_path):
    with pytest.raises(DiffeatError, match="needs its folder: pass --root"):
        list(SPair(SPairOptions()).pairs())
    with pytest.raises(DiffeatError, match="is not a folder"):
        list(SPair(SPairOptions(root=str(tmp_path / "none"))).pairs())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffeatError) as info:
        list(SPair(SPairOptions(root=str(empty))).pairs())
    msg = str(info.value)
    assert "JPEGImages/" in msg and "PairAnnotation/test/" in msg
    assert "https://cvlab.postech.ac.kr/research/SPair-71k/" in msg
    # pointing at the parent of the benchmark gets a hint
    write_spair(tmp_path / "parent" / "SPair-71k")
    with pytest.raises(DiffeatError, match=r"pass --root .*SPair-71k"):
        list(SPair(SPairOptions(root=str(tmp_path / "parent"))).pairs())
    # a broken pair file names the file and the field
    root = write_spair(tmp_path / "broken")
    bad = next((root / "PairAnnotation" / "test").glob("000002*"))
    data = json.loads(bad.read_text())
    del data["trg_kps"]
    bad.write_text(json.dumps(data))
    with pytest.raises(DiffeatError, match=r"000002.*field 'trg_kps' is missing"):
        list(SPair(SPairOptions(root=str(root))).pairs())
    bad.write_text("{not json")
    with pytest.raises(DiffeatError, match="cannot read SPair pair annotation"):
        list(SPair(SPairOptions(root=str(root))).pairs())
    with pytest.raises(ValueError, match="split must be one of"):
        SPairOptions(split="testing").validate()


# ---------------------------------------------------------------------------- PF-Willow


def write_pfwillow(root: Path, *, csv_in_dataset_folder: bool = False, prefix: bool = True) -> Path:
    """PF-dataset/<subset>/*.png and test_pairs_pf.csv (imageA, imageB, XA1..YB10)."""
    rows = []
    images = root / "PF-dataset" if prefix else root
    for s, subset in enumerate(["car(G)", "duck(S)"]):
        d = images / subset
        d.mkdir(parents=True)
        base = subset.split("(")[0]
        for i in range(2):
            smooth_texture((80 + 10 * i, 60), seed=s * 2 + i).save(d / f"{base}_{i:03d}.png")
        xa = [5 + k for k in range(10)]
        ya = [10 + 2 * k for k in range(10)]
        xb = [20 + k for k in range(10)]
        yb = [3 + 3 * k for k in range(10)]
        rows.append(
            [
                f"PF-dataset/{subset}/{base}_000.png",
                f"PF-dataset/{subset}/{base}_001.png",
                *xa,
                *ya,
                *xb,
                *yb,
            ]
        )
    header = ["imageA", "imageB"] + [
        f"{c}{k}" for c in ("XA", "YA", "XB", "YB") for k in range(1, 11)
    ]
    folder = root / "PF-dataset" if csv_in_dataset_folder else root
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_pairs_pf.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return root


@pytest.mark.parametrize(
    "layout",
    [{}, {"csv_in_dataset_folder": True}, {"prefix": False}],
    ids=["cnngeo", "csv-in-pf-dataset", "geoaware"],
)
def test_pfwillow_reads_the_csv(tmp_path, layout):
    root = write_pfwillow(tmp_path / "PF-Willow", **layout)
    pairs = list(PFWillow(PFWillowOptions(root=str(root))).pairs())
    assert len(pairs) == 2
    p = pairs[0]
    assert p.category == "car" and p.flags["subset"] == "car(G)"
    assert p.source.name == "car_000.png" and p.target.name == "car_001.png"
    # columns XA1..XA10, then YA1..YA10: x and y are separate blocks
    assert p.source_points[:3].tolist() == [[5, 10], [6, 12], [7, 14]]
    assert p.target_points[-1].tolist() == [29, 30]
    assert p.num_points == 10 and p.visible.all()
    # no object boxes in PF-Willow: a box is the keypoints' extent
    assert p.target_bbox == (20, 3, 29, 30) and p.source_bbox == (5, 10, 14, 28)
    assert p.source_size == (80, 60) and p.target_size == (90, 60)  # read from the files
    assert pairs[1].category == "duck"
    subset = list(PFWillow(PFWillowOptions(root=str(root), category_from="subset")).pairs())
    assert subset[1].category == "duck(S)"


def test_pfwillow_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffeatError) as info:
        list(PFWillow(PFWillowOptions(root=str(empty))).pairs())
    assert "test_pairs_pf.csv" in str(info.value) and "proposalflow" in str(info.value)
    root = write_pfwillow(tmp_path / "PF-Willow")
    (root / "PF-dataset" / "duck(S)" / "duck_001.png").unlink()
    with pytest.raises(
        DiffeatError, match=r"row 3: image 'PF-dataset/duck\(S\)/duck_001.png' not found"
    ):
        list(PFWillow(PFWillowOptions(root=str(root))).pairs())
    with pytest.raises(ValueError, match="only a 'test' split"):
        PFWillowOptions(split="trn").validate()


# ---------------------------------------------------------------------------- CUB-200-2011


def write_cub(root: Path) -> Path:
    """Two classes; class 1 has 4 test images and 1 training image, class 2 has 3 test images."""
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross"}
    images, labels, split, boxes, parts = [], [], [], [], []
    image_id = 0
    for class_id, count in [(1, 5), (2, 3)]:
        folder = root / "images" / classes[class_id]
        folder.mkdir(parents=True)
        for i in range(count):
            image_id += 1
            name = f"{classes[class_id]}/{classes[class_id].split('.')[1]}_{i:04d}_{image_id}.jpg"
            smooth_texture((64 + i, 48), seed=image_id).save(root / "images" / name)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            training = class_id == 1 and i == 4
            split.append(f"{image_id} {int(training)}")
            boxes.append(f"{image_id} {2 + i}.0 3.0 40.0 30.0")
            for part in range(1, 16):
                # image 2 sees only parts 1-2; every other image sees parts 1-10
                vis = part <= (2 if image_id == 2 else 10)
                x, y = (float(10 + part + i), float(5 + part)) if vis else (0.0, 0.0)
                parts.append(f"{image_id} {part} {x} {y} {int(vis)}")
    (root / "parts").mkdir()
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{k} {v}" for k, v in classes.items()) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "parts" / "part_locs.txt").write_text("\n".join(parts) + "\n")
    (root / "parts" / "parts.txt").write_text(
        "\n".join(f"{k} part{k}" for k in range(1, 16)) + "\n"
    )
    return root


def test_cub_pairs_by_the_documented_rule(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011")
    every = list(CUB(CUBOptions(root=str(root), pairs_per_class=0)).pairs())
    # class 1 test images 1-4 (5 is training): 6 pairs, but image 2 shares only 2 parts
    # (< min_common_parts 3), leaving (1,3) (1,4) (3,4); class 2 (images 6-8): 3 pairs
    assert [p.id for p in every] == ["1-3", "1-4", "3-4", "6-7", "6-8", "7-8"]
    p = every[0]
    assert p.category == "Black footed Albatross" and p.flags["class_id"] == 1
    assert p.num_points == 15 and p.visible.tolist() == [True] * 10 + [False] * 5
    assert p.source_points[0].tolist() == [11.0, 6.0]  # part 1 of image 1 (i = 0)
    assert p.target_points[0].tolist() == [13.0, 6.0]  # part 1 of image 3 (i = 2)
    assert p.source_bbox == (2.0, 3.0, 42.0, 33.0)  # x y w h -> x0 y0 x1 y1
    assert p.source_size == (64, 48) and p.target_size == (66, 48)
    low = [
        q.id for q in CUB(CUBOptions(root=str(root), pairs_per_class=0, min_common_parts=2)).pairs()
    ]
    assert "1-2" in low and "2-4" in low
    # a seeded draw without replacement per class, in candidate order
    drawn = [q.id for q in CUB(CUBOptions(root=str(root), pairs_per_class=2, seed=5)).pairs()]
    cands = {1: ["1-3", "1-4", "3-4"], 2: ["6-7", "6-8", "7-8"]}
    expected = []
    for class_id in (1, 2):
        keep = np.random.default_rng([5, class_id]).choice(3, 2, replace=False)
        expected += [cands[class_id][i] for i in sorted(keep)]
    assert drawn == expected
    assert drawn == [
        q.id for q in CUB(CUBOptions(root=str(root), pairs_per_class=2, seed=5)).pairs()
    ]
    assert [
        q.id for q in CUB(CUBOptions(root=str(root), pairs_per_class=0, max_classes=1)).pairs()
    ] == [
        "1-3",
        "1-4",
        "3-4",
    ]
    train = list(
        CUB(
            CUBOptions(root=str(root), split="train", pairs_per_class=0, min_common_parts=0)
        ).pairs()
    )
    assert train == []  # a single training image makes no pair
    shifted = next(iter(CUB(CUBOptions(root=str(root), pairs_per_class=0, one_based=True)).pairs()))
    assert shifted.source_points[0].tolist() == [10.0, 5.0]
    assert shifted.source_bbox == (1.0, 2.0, 41.0, 32.0)


def test_cub_missing_files(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011")
    (root / "parts" / "part_locs.txt").unlink()
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(DiffeatError) as info:
        list(CUB(CUBOptions(root=str(root))).pairs())
    msg = str(info.value)
    assert "bounding_boxes.txt" in msg and "parts/part_locs.txt" in msg
    assert "cub_200_2011" in msg and str(root) in msg


# ---------------------------------------------------------------------------- plugins


def test_datasets_are_registered_through_the_hook():
    pm = PluginManager(entry_points=False)
    assert pm.names("dataset") == [
        "cub", "davis2017", "hpatches", "jhmdb", "pfwillow", "spair", "synthetic"
    ]  # fmt: skip
    reg = pm.get("dataset", "cub")
    assert reg.plugin == "datasets"
    opts = build_options(reg.factory, {"root": "/x", "pairs_per_class": 3}, "dataset cub")
    assert opts.pairs_per_class == 3 and opts.split == "test"
    with pytest.raises(ConfigError, match="unknown option 'pair_per_class'.*pairs_per_class"):
        build_options(reg.factory, {"pair_per_class": 3}, "dataset cub")
    with pytest.raises(ConfigError, match="split must be test, train or all"):
        build_options(reg.factory, {"split": "val"}, "dataset cub")


def test_the_contract_is_declared_in_core_with_defaults():
    """The card and description of a dataset: declared on :class:`Dataset`, read with its
    defaults from a factory that does not inherit it (no probing at the call sites)."""
    card = card_of(SPair)
    assert card.title == SPair.title and card.default_protocol == "dift"
    assert "  " not in card.layout and "PairAnnotation" in card.layout
    assert card_of(CUB(CUBOptions(root="/x"))) == card_of(CUB)

    class Bare:  # a third-party dataset that only yields pairs
        def __init__(self, options: object = None) -> None:
            self.options = options

        def pairs(self) -> Iterator[Pair]:
            return iter(())

    assert card_of(Bare) == DatasetCard(title="", url="", layout="", default_protocol="dift")
    assert description_of(Bare()) == {}
    described = description_of(SPair(SPairOptions(root="/x")))
    assert described["title"] == SPair.title and described["options"]["root"] == "/x"


def test_pair_images_are_each_image_once_with_its_category(tmp_path):
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    pairs = [
        Pair("1", a, b, "cat", [[0, 0]], [[0, 0]]),
        Pair("2", b, a, "cat", [[0, 0]], [[0, 0]]),
        Pair("3", a, c, "dog", [[0, 0]], [[0, 0]]),
    ]
    refs = pair_images(pairs)
    assert refs == [
        ImageRef(a, "cat"),
        ImageRef(b, "cat"),
        ImageRef(a, "dog"),
        ImageRef(c, "dog"),
    ]
    Image.new("RGB", (5, 4)).save(a)
    lazy = LazyImages(refs)
    assert len(lazy) == 4 and len(lazy[1:]) == 3
    first = lazy[0]
    assert not isinstance(first, str) and first.size == (5, 4) and first.category == "cat"
    assert lazy[1] == str(b)  # unreadable: its path, for the pipeline to report


# ---------------------------------------------------------------------------- make-synthetic


def bilinear(img: np.ndarray, x: float, y: float) -> np.ndarray:
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    a, b = img[y0, x0].astype(float), img[y0, x0 + 1].astype(float)
    c, d = img[y0 + 1, x0].astype(float), img[y0 + 1, x0 + 1].astype(float)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def test_make_synthetic_writes_exact_ground_truth(tmp_path):
    src = tmp_path / "photos"
    (src / "birds").mkdir(parents=True)
    smooth_texture((96, 72), seed=1).save(src / "birds" / "a.png")
    smooth_texture((80, 80), seed=2).save(src / "b.png")
    out = tmp_path / "bench"
    report = make_synthetic(
        out,
        [src],
        pairs=8,
        seed=3,
        kinds=["translate", "flip", "homography", "identity"],
        ext="png",
    )
    assert report.pairs == 8 and report.images == 2
    assert sum(report.kinds.values()) == 8 and set(report.kinds) == {
        "translate",
        "flip",
        "homography",
        "identity",
    }
    assert report.categories == ["birds", "synthetic"]
    assert (out / "Layout" / "large" / "test.txt").read_text().count("\n") == 8
    assert len(list((out / "ImageAnnotation").rglob("*.json"))) == 2 + 8
    pairs = list(Synthetic(SPairOptions(root=str(out))).pairs())
    assert len(pairs) == 8
    for p in pairs:
        kind = p.flags["transform"]["kind"]
        h = np.array(p.flags["transform"]["homography"])
        np.testing.assert_allclose(apply_homography(h, p.source_points), p.target_points, atol=1e-3)
        s = np.asarray(Image.open(p.source).convert("RGB"))
        t = np.asarray(Image.open(p.target).convert("RGB"))
        assert p.num_visible > 0
        for (sx, sy), (tx, ty) in zip(p.source_points, p.target_points):
            expected = s[int(sy), int(sx)].astype(float)
            if kind == "homography":
                # the target pixel nearest the mapped point holds the source colour there
                # (bicubic resampling of a smooth texture: a few grey levels off)
                got = bilinear(t, tx, ty)
                assert np.abs(got - expected).max() < 12, (kind, p.id)
            else:
                assert t[round(ty), round(tx)].tolist() == expected.tolist(), (kind, p.id)
        x0, y0, x1, y1 = p.target_bbox
        assert 0 <= x0 < x1 <= p.target_size[0] - 1 and 0 <= y0 < y1 <= p.target_size[1] - 1
    with pytest.raises(DiffeatError, match="already holds a benchmark"):
        make_synthetic(out, [src], pairs=1)
    with pytest.raises(DiffeatError, match="unknown transform kind 'shear'"):
        make_synthetic(tmp_path / "x", [src], kinds=["shear"])
    with pytest.raises(DiffeatError, match="no images found"):
        (tmp_path / "nothing").mkdir()
        make_synthetic(tmp_path / "y", [tmp_path / "nothing"])


def _pair_fingerprints(out: Path) -> list[tuple[str, str, str]]:
    """Per pair: (source image, kind, a digest of everything that makes the pair: source
    image name, target pixels and both keypoint lists)."""
    import hashlib

    rows = []
    for f in sorted((out / "PairAnnotation" / "test").glob("*.json")):
        data = json.loads(f.read_text())
        target = out / "JPEGImages" / data["category"] / data["trg_imname"]
        digest = hashlib.sha256(target.read_bytes())
        digest.update(json.dumps([data["src_imname"], data["src_kps"], data["trg_kps"]]).encode())
        rows.append((data["src_imname"], data["diffeat_transform"]["kind"], digest.hexdigest()))
    return rows


@pytest.mark.parametrize("kinds", [("homography", "flip"), ("identity", "flip", "homography")])
@pytest.mark.parametrize("n", range(1, 8))
def test_make_synthetic_every_image_meets_every_kind(tmp_path, n, kinds):
    """With 5 images and kinds (homography, flip), image i used to get the same kind in every
    round: 2 flip pairs repeated 4 times each. Now each image meets each kind, and no two pairs
    are byte-identical, even with more pairs than images x kinds."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(n):
        smooth_texture((24, 20), seed=i).save(photos / f"p{i}.png")
    m = len(kinds)
    pairs = n * m + n  # one more round: the extra pairs must not repeat identity / flip pairs
    report = make_synthetic(
        tmp_path / "bench", [photos], pairs=pairs, seed=0, kinds=list(kinds), ext="png", points=6
    )
    rows = _pair_fingerprints(tmp_path / "bench")
    assert len(rows) == pairs and report.duplicates == 0
    met: dict[str, set[str]] = {}
    for image, kind, _ in rows[: n * m]:
        met.setdefault(image, set()).add(kind)
    assert len(met) == n and all(seen == set(kinds) for seen in met.values()), met
    digests = [d for _, _, d in rows]
    assert len(set(digests)) == len(digests)
    assert sum(report.kinds.values()) == pairs


def test_make_synthetic_duplicates_only_when_unavoidable(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        smooth_texture((24, 20), seed=i).save(photos / f"p{i}.png")
    # identity and flip only: 2 images give 4 distinct pairs; 6 pairs repeat 2 (counted)
    report = make_synthetic(
        tmp_path / "a", [photos], pairs=6, kinds=["identity", "flip"], ext="png", points=6
    )
    assert report.duplicates == 2 and report.kinds == {"identity": 3, "flip": 3}
    assert report.to_dict()["duplicates"] == 2
    # small translations repeat easily (20 px: shifts of -2..2): a repeat is drawn again
    report = make_synthetic(
        tmp_path / "b", [photos / "p0.png"], pairs=10, kinds=["translate"], ext="png", points=10
    )
    digests = [d for _, _, d in _pair_fingerprints(tmp_path / "b")]
    assert report.duplicates == 0 and len(set(digests)) == 10


def test_kind_assignment_keeps_the_original_where_it_was_right():
    """The original rule kinds[(k + k // n) mod m] met every kind when gcd(n + 1, m) == 1:
    those seeds keep their pairs."""
    for n in range(1, 9):
        for m in range(1, 5):
            kinds = ["homography", "translate", "identity", "flip"][:m]
            if math.gcd(n + 1, m) != 1:
                continue
            for k in range(n * m):
                assert assign_kind(k, n, kinds) == kinds[(k + k // n) % m], (n, m, k)


def test_homography_kinds_are_what_they_say():
    rng = np.random.default_rng(0)
    flip = random_homography("flip", (10, 6), rng)
    assert apply_homography(flip, np.array([[0.0, 2.0], [9.0, 5.0]])).tolist() == [[9, 2], [0, 5]]
    shift = random_homography("translate", (100, 50), rng)
    assert (
        np.allclose(shift[:2, :2], np.eye(2)) and abs(shift[0, 2]) <= 10 and abs(shift[1, 2]) <= 5
    )
    assert float(shift[0, 2]).is_integer()
    h = random_homography("homography", (100, 100), rng)
    corners = apply_homography(h, np.array([[0.0, 0.0], [99.0, 99.0]]))
    assert np.abs(corners - [[0, 0], [99, 99]]).max() < 40  # mild


def test_warp_follows_the_pixel_index_convention():
    """A ramp (R = 4x, G = 4y) survives bilinear / bicubic resampling exactly, so the target's
    value at the mapped point must equal the source's up to PIL's 8-bit truncation (which
    floors: a mean error of -0.5 grey levels). A geometric slip of d pixels adds 4 d levels."""
    from diffeat.plugins.datasets.synthetic import _shift, warp_image

    xs, ys = np.meshgrid(np.arange(64), np.arange(64))
    ramp = np.stack([4 * xs, 4 * ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    image = Image.fromarray(ramp)
    rng = np.random.default_rng(1)
    zoom = _shift(4.0, 2.0) @ np.diag([1.5, 1.25, 1.0])  # the half-pixel terms matter here
    for h in [zoom] + [random_homography("homography", (64, 64), rng) for _ in range(3)]:
        t = np.asarray(warp_image(image, h)).astype(float)
        src = rng.uniform(4, 40, size=(300, 2))
        dst = apply_homography(h, src)
        ok = (dst.min(axis=1) > 3) & (dst.max(axis=1) < 60)
        got = np.array([bilinear(t, x, y)[:2] for x, y in dst[ok]])
        err = got - 4 * src[ok]
        assert ok.sum() > 50
        assert np.abs(err.mean(axis=0) + 0.5).max() < 0.25, err.mean(axis=0)
        assert np.abs(err).max() < 1.6


# ---------------------------------------------------------------------------- annotation paths


def test_inside_root_refuses_paths_that_leave_the_root(tmp_path):
    root = tmp_path / "data"
    assert inside_root(root, "a/b.jpg", "ann") == root / "a" / "b.jpg"
    assert inside_root(root, "a/../b.jpg", "ann") == root / "b.jpg"  # still inside
    assert inside_root(root, "a\\b.jpg", "ann") == root / "a" / "b.jpg"  # written on Windows
    for bad in [
        "../x.jpg",
        "a/../../x.jpg",
        "..",
        "/etc/passwd",
        "\\\\server\\share\\x.jpg",
        "C:\\x.jpg",
        "c:x.jpg",
        "a\\..\\..\\x.jpg",
        "a/\0b.jpg",
    ]:
        with pytest.raises(DiffeatError) as info:
            inside_root(root, bad, "pairs.json, field src")
        message = str(info.value)
        assert message.startswith("pairs.json, field src: the path ")
        assert repr(bad) in message and f"outside the dataset root {root}" in message


def test_inside_root_keeps_symlinked_folders(tmp_path):
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    smooth_texture((20, 20)).save(elsewhere / "a.png")
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(elsewhere, target_is_directory=True)
    assert inside_root(root, "images/a.png", "ann").is_file()


@pytest.mark.parametrize(
    "field, value",
    [
        ("src_imname", "../../../secret.jpg"),
        ("trg_imname", "/etc/passwd"),
        ("category", "../../.."),
        ("category", "/etc"),
    ],
)
def test_spair_refuses_annotation_paths_outside_the_root(tmp_path, field, value):
    root = write_spair(tmp_path / "SPair-71k")
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    ann = next((root / "PairAnnotation" / "test").glob("000001-*.json"))
    data = json.loads(ann.read_text())
    data[field] = value
    ann.write_text(json.dumps(data))
    with pytest.raises(DiffeatError) as info:
        list(SPair(SPairOptions(root=str(root))).pairs())
    message = str(info.value)
    assert str(ann) in message and "outside the dataset root" in message and str(root) in message
    if value.startswith("/"):
        assert f"the path {value!r} points outside" in message


def test_synthetic_refuses_annotation_paths_outside_the_root(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    smooth_texture((64, 48), seed=1).save(src / "a.png")
    out = tmp_path / "bench"
    make_synthetic(out, [src], pairs=2, seed=0, kinds=["translate"], ext="png")
    ann = sorted((out / "PairAnnotation" / "test").glob("*.json"))[0]
    data = json.loads(ann.read_text())
    data["src_imname"] = "../../../../photos/a.png"
    ann.write_text(json.dumps(data))
    with pytest.raises(DiffeatError, match="outside the dataset root"):
        list(Synthetic(SPairOptions(root=str(out))).pairs())


@pytest.mark.parametrize("value", ["../secret.png", "/etc/passwd", "PF-dataset/../../secret.png"])
def test_pfwillow_refuses_annotation_paths_outside_the_root(tmp_path, value):
    root = write_pfwillow(tmp_path / "PF-Willow")
    smooth_texture((20, 20)).save(tmp_path / "secret.png")
    path = root / "test_pairs_pf.csv"
    rows = list(csv.reader(path.open()))
    rows[2][1] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DiffeatError) as info:
        list(PFWillow(PFWillowOptions(root=str(root))).pairs())
    message = str(info.value)
    assert f"{path} row 3" in message and repr(value) in message
    assert "outside the dataset root" in message


@pytest.mark.parametrize("value", ["../../secret.jpg", "/tmp/secret.jpg"])
def test_cub_refuses_image_paths_outside_the_root(tmp_path, value):
    root = write_cub(tmp_path / "CUB_200_2011")
    smooth_texture((20, 20)).save(tmp_path / "secret.jpg")
    listing = root / "images.txt"
    lines = listing.read_text().splitlines()
    lines[0] = f"1 {value}"
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(DiffeatError) as info:
        list(CUB(CUBOptions(root=str(root), pairs_per_class=0)).pairs())
    message = str(info.value)
    assert f"{listing}, image 1" in message and "outside the dataset root" in message
