"""Datasets on tiny fixtures written by the tests: folders, CSV, VOC/ImageNet XML, COCO, synthetic benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from convlens.data import (
    CSVImageDataset,
    ImageFolder,
    SyntheticShapes,
    VOCDetection,
    XMLBoxDataset,
    boxes_to_mask,
    preprocess_mask,
)
from convlens.data.synthetic import CLASS_NAMES, SHAPES, TEXTURES, generate_batch
from convlens.data.voc import find_voc2007, parse_voc_xml
from convlens.models.images import ImageLoadError
from convlens.models.preprocessing import Preprocessing


def _png(path: Path, size: tuple[int, int] = (12, 10), value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_image_folder_classes_from_folder_names(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.png")
    _png(tmp_path / "dog" / "c.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    data = ImageFolder(tmp_path)
    assert data.class_names == ["cat", "dog"]
    assert data.sample_ids() == ["cat/a.png", "dog/b.png", "dog/broken.jpg", "dog/c.png"]
    assert [data[i].labels for i in (0, 1, 3)] == [[0], [1], [1]]
    with pytest.raises(ImageLoadError):
        data.load(2)
    # the model's class order wins when given
    assert ImageFolder(tmp_path, class_names=["dog", "cat", "bird"])[0].labels == [1]
    with pytest.raises(ValueError, match="unknown class"):
        ImageFolder(tmp_path, class_names=["bird"])


def test_flat_folder_has_no_labels_and_empty_folder_fails(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    _png(tmp_path / "y.jpg")
    data = ImageFolder(tmp_path)
    assert len(data) == 2 and data[0].labels == [] and not data.labelled
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing")


def test_csv_dataset_labels_by_name_and_id(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "list.csv").write_text("path,label\nimg/a.png,zebra\nimg/b.png,ant\n")
    data = CSVImageDataset(tmp_path / "list.csv")
    assert data.class_names == ["ant", "zebra"]
    assert [data[0].labels, data[1].labels] == [[1], [0]]
    (tmp_path / "ids.csv").write_text("path,label\nimg/a.png,3\n")
    assert CSVImageDataset(tmp_path / "ids.csv").class_names == ["0", "1", "2", "3"]
    (tmp_path / "bad.csv").write_text("file,cls\nimg/a.png,1\n")
    with pytest.raises(ValueError, match="needs columns"):
        CSVImageDataset(tmp_path / "bad.csv")
    (tmp_path / "unknown.csv").write_text("path,label\nimg/a.png,yak\n")
    with pytest.raises(ValueError, match=r"unknown\.csv:2: unknown class 'yak'"):
        CSVImageDataset(tmp_path / "unknown.csv", class_names=["ant", "zebra"])


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>20</width><height>16</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>3</ymax></bndbox></object>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>3</xmin><ymin>2</ymin><xmax>6</xmax><ymax>5</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>10</xmin><ymin>10</ymin><xmax>20</xmax><ymax>16</ymax></bndbox></object>
</annotation>"""


def _voc_tree(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for name in ("000001", "000002"):
        (voc / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name))
    (voc / "JPEGImages").mkdir()
    Image.new("RGB", (20, 16), (10, 20, 30)).save(voc / "JPEGImages" / "000001.jpg")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")  # 000002 has no image file
    return voc


def test_voc_boxes_become_union_masks(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    assert find_voc2007(tmp_path) == voc
    data = VOCDetection(tmp_path)
    sample = data[0]
    dog, person = data.class_names.index("dog"), data.class_names.index("person")
    assert sample.labels == sorted([dog, person])
    # 1-based inclusive boxes (1,1)-(4,3) and (3,2)-(6,5) -> 0-based rows 0..2 x cols 0..3 and rows 1..4 x cols 2..5
    expected = np.zeros((16, 20), dtype=bool)
    expected[0:3, 0:4] = True
    expected[1:5, 2:6] = True
    np.testing.assert_array_equal(sample.masks[dog], expected)
    assert int(sample.masks[dog].sum()) == 12 + 16 - 4  # union of a 3x4 and a 4x4 box overlapping on 2x2
    # the difficult person box is clipped to the image: cols 9..19, rows 9..15
    assert int(sample.masks[person].sum()) == 11 * 7
    assert VOCDetection(tmp_path, include_difficult=False)[0].labels == [dog]
    with pytest.raises(ImageLoadError, match="000002"):
        data.load(1)  # listed, annotated, but no image: reported, not crashed
    with pytest.raises(FileNotFoundError, match="VOCtest_06-Nov-2007"):
        VOCDetection(tmp_path / "nowhere")


def test_parse_voc_xml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><name>dog</name><bndbox><xmin>1</xmin></bndbox></object></annotation>")
    with pytest.raises(ValueError, match="box coordinate"):
        parse_voc_xml(bad)
    bad.write_text("<annotation><object>")
    with pytest.raises(ValueError, match="not a valid XML"):
        parse_voc_xml(bad)


def test_imagenet_style_xml_with_synset_mapping(tmp_path: Path) -> None:
    (tmp_path / "ann").mkdir()
    _png(tmp_path / "img" / "ILSVRC2012_val_00000001.JPEG", size=(20, 16))
    xml = VOC_XML.replace("<name>dog</name>", "<name>n02085620</name>")
    xml = xml.replace("<name>person</name>", "<name>n01440764</name>")
    (tmp_path / "ann" / "ILSVRC2012_val_00000001.xml").write_text(xml)
    (tmp_path / "synsets.txt").write_text("n01440764 tench, Tinca tinca\nn02085620 Chihuahua\n")
    data = XMLBoxDataset(tmp_path / "img", tmp_path / "ann", tmp_path / "synsets.txt")
    assert data.class_names == ["tench, Tinca tinca", "Chihuahua"]
    sample = data[0]
    assert sample.labels == [0, 1] and int(sample.masks[1].sum()) == 24


def test_boxes_to_mask_clips() -> None:
    mask = boxes_to_mask([(-3, -3, 1, 0), (3, 2, 99, 2)], height=4, width=5)
    assert mask.sum() == 2 + 2 and mask[0, 0] and mask[0, 1] and mask[2, 3] and mask[2, 4]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_instances_masks(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    from convlens.data import COCOInstances

    Image.new("RGB", (10, 8)).save(tmp_path / "a.jpg")
    # uncompressed RLE is column-major: 8 rows per column; counts alternate background/foreground
    # column 0 empty (8), column 1 rows 2..4 (skip 2, take 3), rest empty
    rle_counts = [8 + 2, 3, 80 - 8 - 2 - 3]
    annotations = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 8}, {"id": 9, "file_name": "b.jpg",
                                                                                  "width": 10, "height": 8}],
        "categories": [{"id": 5, "name": "kite"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "iscrowd": 0, "area": 16, "bbox": [2, 1, 4, 4],
             "segmentation": [[2.0, 1.0, 7.0, 1.0, 7.0, 5.0, 2.0, 5.0]]},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 3, "bbox": [1, 2, 1, 3],
             "segmentation": {"counts": rle_counts, "size": [8, 10]}},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(annotations))
    data = COCOInstances(path, tmp_path)
    assert data.class_names == ["person", "kite"]  # category ids 1, 5 -> classes 0, 1
    assert data.sample_ids() == ["7"]  # image 9 has no annotation
    sample = data[0]
    expected_person = np.zeros((8, 10), dtype=bool)
    expected_person[2:5, 1] = True
    np.testing.assert_array_equal(sample.masks[0], expected_person)
    kite = sample.masks[1]
    assert kite[3, 4] and not kite[7, 9] and 12 <= kite.sum() <= 30  # the polygon's interior
    assert COCOInstances(path, tmp_path, include_crowd=False)[0].labels == [1]


def test_coco_without_pycocotools_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    from convlens.data import coco

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("pycocotools"):
            raise ImportError("no pycocotools")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'convlens\[coco\]'"):
        coco.COCOInstances(tmp_path / "x.json", tmp_path)


def test_preprocess_mask_follows_the_image_geometry() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[3, 5] = True
    # resize 8 -> 4 (nearest picks source pixel 2i + 1), then centre crop 2x2 (offset 1)
    out = preprocess_mask(mask, Preprocessing(size=2, resize=4))
    assert out.shape == (2, 2) and out.tolist() == [[False, True], [False, False]]
    # the same geometry applied to an image (nearest) keeps the marked pixel at the same place
    image = Image.fromarray(np.where(mask[..., None], 255, 0).repeat(3, -1).astype(np.uint8))
    seen = np.asarray(Preprocessing(size=2, resize=4, interpolation="nearest").display(image))[..., 0] > 127
    np.testing.assert_array_equal(seen, out)


# ----------------------------------------------------------------------------- synthetic benchmark
def test_synthetic_is_reproducible_per_index_and_split() -> None:
    data = SyntheticShapes(size=6, seed=3)
    a, b = data.generate(4), SyntheticShapes(size=100, seed=3).generate(4)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.mask, b.mask)
    pixels, _labels, _masks = generate_batch(4, 1, seed=3, split="test")
    np.testing.assert_array_equal(pixels[0], a.pixels)
    other = SyntheticShapes(size=6, seed=3, split="train").generate(4)
    assert not np.array_equal(other.pixels, a.pixels)
    assert data.sample_ids()[4] == "test-3-000004" and data[4].labels == [a.label]
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(split="holdout")


def test_synthetic_ground_truth_is_the_class_object() -> None:
    labels = []
    for i in range(40):
        item = SyntheticShapes(size=40, seed=11).generate(i)
        labels.append(item.label)
        shape, texture, cy, cx, r = item.objects[0]
        assert (shape, texture) == (SHAPES[item.label], TEXTURES[item.label])
        assert CLASS_NAMES[item.label] == f"{shape}+{texture}"
        # distractors use off-diagonal pairs only, and objects do not overlap
        for s, t, py, px, pr in item.objects[1:]:
            assert SHAPES.index(s) != TEXTURES.index(t)
            assert (cy - py) ** 2 + (cx - px) ** 2 >= (r + pr + 3) ** 2
        assert 2 <= len(item.objects) - 1 <= 4
        # exact mask: one connected region around the object's centre, painted with exactly two colours
        _components, count = ndimage.label(item.mask)
        assert count == 1 and item.mask[cy, cx]
        colours = np.unique(item.pixels[item.mask].reshape(-1, 3), axis=0)
        assert len(colours) == 2
        # the two colours follow the texture: stripes are uniform along a row (h) or a column (v)
        ys, xs = np.nonzero(item.mask)
        values = item.pixels[ys, xs].astype(int) @ np.array([65536, 256, 1])
        if texture in ("hstripes", "vstripes"):
            key = ys if texture == "hstripes" else xs
            for k in np.unique(key):
                assert len(np.unique(values[key == k])) == 1
    assert set(labels) == {0, 1, 2, 3}


def test_synthetic_models_load_with_weights_only_and_are_accurate() -> None:
    import torch

    from convlens.models.synthetic import (
        SYNTHETIC_MODELS,
        evaluate_accuracy,
        load_synthetic_model,
        synthetic_model_info,
    )

    info = synthetic_model_info()
    pixels, labels, _ = generate_batch(0, 200, seed=0, split="test")
    for name in SYNTHETIC_MODELS:
        loaded = load_synthetic_model(name)
        assert info[name]["test_accuracy"] >= 0.95 and info[name]["seed"] == 0
        # re-measure on the first 200 test images: the committed weights reproduce the recorded accuracy
        assert evaluate_accuracy(loaded.module, pixels, labels) >= 0.95
        state = torch.load(Path(loaded.source), weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        # the class names recorded with the weights are the generator's, in output order
        assert loaded.class_names == CLASS_NAMES == ["circle+hstripes", "square+vstripes", "triangle+checker",
                                                     "cross+dots"]
        assert Path(loaded.source).parent.name == "weights" and Path(loaded.source).parent.parent.name == "models"


def test_data_holds_datasets_only() -> None:
    """Model definitions, weights and the trainer moved out of data/ (models/synthetic.py, tools/)."""
    import convlens.data

    folder = Path(convlens.data.__file__).parent
    assert not [p.name for p in folder.rglob("*") if p.suffix in (".pt", ".pth") or p.name == "weights"]
    assert not (folder / "synthetic_models.py").exists() and not (folder / "train_synthetic.py").exists()
