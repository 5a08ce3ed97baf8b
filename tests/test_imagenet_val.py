"""ILSVRC2012 val boxes in both formats (Kaggle's LOC_val_solution.csv, the devkit's per-image XML) on tiny
synthetic folders, and their use by bench-loc's splits."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cams.bench_loc import imagenet_val as V

TENCH, GOLDFISH, TABBY = "n01440764", "n01443537", "n02123045"


def jpeg(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path, format="JPEG")
    return path


def xml(path: Path, stem: str, objects) -> Path:
    body = "".join(f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                   f"<ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><folder>val</folder><filename>{stem}</filename><source><database>ILSVRC_2012"
                    f"</database></source><size><width>40</width><height>30</height></size>{body}</annotation>")
    return path


def test_sorted_synset_order_gives_the_class_ids_of_imagenet_heads():
    from pfnet.zoo import imagenet_classes

    names = V.synsets()
    assert len(names) == 1000 and list(names) == sorted(names)
    assert V.class_id(TENCH) == 0 and V.class_id(GOLDFISH) == 1 and V.class_id("n15075141") == 999
    assert V.class_id("n99999999") is None
    classes = imagenet_classes()  # torchvision's names, in its heads' order
    assert classes[V.class_id(TENCH)] == "tench" and classes[V.class_id(TABBY)] == "tabby"


def test_loc_solution_csv_in_the_kaggle_layout(tmp_path):
    images = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    first = jpeg(images / "ILSVRC2012_val_00000001.JPEG")
    second = jpeg(images / "ILSVRC2012_val_00000002.JPEG")
    jpeg(images / "ILSVRC2012_val_00000003.JPEG")
    jpeg(images / "ILSVRC2012_val_00000006.JPEG")
    (tmp_path / V.SOLUTION_CSV).write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{TABBY} 5 6 20 25 {TABBY} 21 1 40 30 \n"
        f"ILSVRC2012_val_00000001,{TENCH} 1 1 40 30\n"
        "ILSVRC2012_val_00000003,n99999999 1 1 10 10\n"  # not a synset: the box is kept, without a label
        "ILSVRC2012_val_00000004,n01440764 1 1 10 10\n"  # no such image
        f"ILSVRC2012_val_00000005,{TENCH} 1 1 10\n"       # four values
        f"ILSVRC2012_val_00000006,{TENCH} 9 1 3 10\n")  # x1 < x0: no usable box
    assert V.find_layout(tmp_path) == ("csv", tmp_path / V.SOLUTION_CSV, images)
    problems: list[str] = []
    out = V.read_imagenet_val(tmp_path, problems)
    assert [a.path for a in out] == [first, second, images / "ILSVRC2012_val_00000003.JPEG"]
    assert out[0].boxes == [(0.0, 0.0, 40.0, 30.0)] and out[0].class_ids == (0,) and out[0].labels == (TENCH,)
    assert out[1].boxes == [(4.0, 5.0, 20.0, 25.0), (20.0, 0.0, 40.0, 30.0)] and out[1].class_ids == (281,)
    assert out[2].class_ids == () and out[0].source == V.SOLUTION_CSV
    text = "\n".join(problems)
    assert "'n99999999' is not an ILSVRC2012 synset" in text and "line 6: 4 values" in text
    assert "1 listed image(s) not found" in text and "line 7: box ('9', '1', '3', '10') is empty" in text
    assert "line 7: no usable box" in text
    named = V.read_imagenet_val(tmp_path / V.SOLUTION_CSV, [], class_names=[f"class {i}" for i in range(1000)])
    assert named[1].labels == ("class 281",)


def test_devkit_xml_with_images_sorted_into_synset_folders(tmp_path):
    first = jpeg(tmp_path / "images" / TENCH / "ILSVRC2012_val_00000001.JPEG")
    second = jpeg(tmp_path / "images" / GOLDFISH / "ILSVRC2012_val_00000002.JPEG")
    xml(tmp_path / "val" / "ILSVRC2012_val_00000001.xml", "ILSVRC2012_val_00000001", [(TENCH, 11, 6, 30, 20)])
    xml(tmp_path / "val" / "ILSVRC2012_val_00000002.xml", "ILSVRC2012_val_00000002",
        [(GOLDFISH, 1, 1, 10, 10), (GOLDFISH, 5, 5, 40, 30)])
    xml(tmp_path / "val" / "ILSVRC2012_val_00000009.xml", "ILSVRC2012_val_00000009", [(TENCH, 1, 1, 5, 5)])
    (tmp_path / "val" / "ILSVRC2012_val_00000003.xml").write_text("<annotation><object>")  # broken
    jpeg(tmp_path / "images" / "ILSVRC2012_val_00000003.JPEG")
    kind, folder, image_root = V.find_layout(tmp_path)
    assert (kind, folder, image_root) == ("xml", tmp_path / "val", tmp_path)
    problems: list[str] = []
    out = V.read_imagenet_val(tmp_path, problems)
    assert [a.path for a in out] == [first, second]
    assert out[0].boxes == [(10.0, 5.0, 30.0, 20.0)] and out[0].class_ids == (0,)
    assert len(out[1].boxes) == 2 and out[1].class_ids == (1,) and out[1].source == "ILSVRC2012_val_00000002.xml"
    text = "\n".join(problems)
    assert "ILSVRC2012_val_00000003.xml" in text and "1 XML file(s) without an image" in text


def test_other_folders_are_not_imagenet(tmp_path):
    assert V.find_layout(tmp_path) is None and V.read_imagenet_val(tmp_path, []) is None
    voc = tmp_path / "cat.xml"
    voc.write_text("<annotation><filename>cat.jpg</filename><object><name>cat</name></object></annotation>")
    assert V.find_layout(tmp_path) is None
    assert V.find_layout(tmp_path / "missing") is None
    (tmp_path / V.SOLUTION_CSV).write_text("image,x0\n")
    problems: list[str] = []
    assert V.read_imagenet_val(tmp_path, problems) == [] and "expected the header" in problems[0]


def test_annotations_feed_bench_loc_splits(tmp_path):
    from cams.bench_loc.data import data_splits
    from pfnet.preprocess import Preprocess

    for index in range(4):
        stem = f"ILSVRC2012_val_{index + 1:08d}"
        jpeg(tmp_path / f"{stem}.JPEG", size=(80, 40))
        xml(tmp_path / f"{stem}.xml", stem, [(TABBY, 41, 1, 80, 40)])
    annotations = V.read_imagenet_val(tmp_path, [])
    assert len(annotations) == 4
    problems: list[str] = []
    pre = Preprocess(input_size=32, resize_size=32)
    val, test = data_splits(annotations, pre, n=10, val_n=1, seed=0, problems=problems, cache={})
    assert len(val) == 1 and len(test) == 3 and not problems
    assert test.samples[0].boxes == [pytest.approx((16.0, 0.0, 32.0, 32.0))]  # right half of the squashed image
    assert test.tensors(0, 3).shape == (3, 3, 32, 32)


def test_bench_loc_data_reads_imagenet_val_and_scores_accuracy_by_class_id(tmp_path, monkeypatch, capsys):
    """--data on an ILSVRC2012 val folder: recognised before the generic reader, demo models skipped, accuracy
    compared by class id. The model always answers class 517, one of the synsets WordNet calls "crane" (134 is
    the bird): the images labelled with 517's synset are hits, those labelled with 134's are not."""
    import csv

    import torch

    from cams.bench_loc import bench as bench_run
    from pfcam.cli import main
    from pfnet import zoo
    from pfnet.preprocess import Preprocess

    bird, machine = V.synsets()[134], V.synsets()[517]
    rows = []
    for index in range(1, 9):
        stem = f"ILSVRC2012_val_{index:08d}"
        jpeg(tmp_path / "val_images" / f"{stem}.JPEG", size=(64, 48))
        rows.append(f"{stem},{machine if index % 2 else bird} 5 5 40 40")
    (tmp_path / V.SOLUTION_CSV).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    source = zoo.WeightSource("bundled", "none.safetensors", "none.safetensors")
    entry = zoo.ZooEntry("tiny_imagenet", "tiny", "resnet50_hybrid", "resnet", source, Preprocess(64, 64),
                         classes="imagenet", arch_kwargs={"width_mult": 0.25})
    monkeypatch.setitem(zoo.ZOO, "tiny_imagenet", entry)

    def load(model_id, device=None):
        torch.manual_seed(0)
        model = zoo.ZOO[model_id].build().eval()
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.zero_()
            model.fc.bias[517] = 10.0
        return model

    monkeypatch.setattr(bench_run, "load_model", load)
    out_csv = tmp_path / "out.csv"
    status = main(["bench-loc", "--models", "tiny_imagenet,demo_r50", "--layers", "layer4", "--methods", "gradcam",
                   "--data", str(tmp_path), "--n", "8", "--val-n", "0", "--faith-n", "0", "--csv", str(out_csv)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "demo_r50: ILSVRC2012 val needs a 1,000-class ImageNet model" in err
    assert "ILSVRC2012 val (LOC_val_solution.csv, 8 annotated images" in out
    with out_csv.open() as handle:
        records = list(csv.DictReader(handle))
    assert {r["model"] for r in records} == {"tiny_imagenet"}
    assert all(float(r["accuracy"]) == 0.5 for r in records)
