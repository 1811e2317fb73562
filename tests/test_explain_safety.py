"""``convlens explain`` never loses a user's files and answers bad input with exit 2 and one line.

Each test reproduces one finding of the adversarial review (issue 10) through the real command line,
in-process, on a tiny model registered with :func:`convlens.models.register_model` (the test hook), so
every case runs in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.core.files import OutputLock, temporary_name
from convlens.models import LoadedModel, register_model
from convlens.models.preprocessing import Preprocessing
from convlens.models.zoo import load_state_dict, load_weights_into, unregister_model

runner = CliRunner()
TINY = "tiny-test"
CLASSES = ["cat", "<script>alert(1)</script>", "dog"]


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_model(weights: str | os.PathLike[str] | None = None) -> LoadedModel:
    torch.manual_seed(0)
    module = _TinyNet().eval()
    if weights is not None:
        load_weights_into(module, load_state_dict(weights), TINY, weights)
    return LoadedModel(TINY, module, Preprocessing(size=16, resize=16), list(CLASSES), False, "test")


@pytest.fixture(autouse=True, scope="module")
def _tiny_registered():
    register_model(TINY, tiny_model)
    yield
    unregister_model(TINY)


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def explain(*args: str | Path) -> tuple[int, str]:
    words = [str(a) for a in args]
    result = runner.invoke(app, ["explain", *words, *([] if "--model" in words else ["--model", TINY])])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure of every test here
    return result.exit_code, result.output


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a content hash (files) or 'dir'."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".convlens"))


# ------------------------------------------------------------------------------ 1. never lose user files
def test_image_named_like_a_user_folder_leaves_the_folder_alone(tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / "holiday").mkdir(parents=True)
    (out / "holiday" / "notes.txt").write_text("x")
    code, output = explain(_image(tmp_path / "holiday.png"), "--out", out)
    assert code == 0, output
    assert (out / "holiday" / "notes.txt").read_text() == "x" and sorted(os.listdir(out / "holiday")) == ["notes.txt"]
    summary = json.loads((out / "results.json").read_text())
    folder = summary["images"][0]
    assert folder.startswith("holiday-") and (out / folder / "gradcam.npy").is_file()


@pytest.mark.parametrize(("name", "folder"), [("..png", "image"), ("...png", "image"), (".png", "png")])
def test_dot_names_never_escape_or_replace_the_output_folder(tmp_path: Path, name: str, folder: str) -> None:
    inputs, out = tmp_path / "in", tmp_path / "o"
    _image(inputs / name)
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (tmp_path / "beside.txt").write_text("keep too")
    before = _snapshot(tmp_path)
    code, output = explain(inputs / name, "--out", out)
    assert code == 0, output
    after = _snapshot(tmp_path)
    assert {k: v for k, v in before.items() if k in after} == before  # nothing changed or removed
    new = sorted(set(after) - set(before))
    assert all(k.startswith("o/") for k in new)
    assert json.loads((out / "results.json").read_text())["images"] == [folder]
    assert (out / folder / "result.json").is_file()
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_same_file_name_in_two_folders_gets_two_folders(tmp_path: Path) -> None:
    a, b = _image(tmp_path / "x" / "a.png", 1), _image(tmp_path / "y" / "a.png", 2)
    out = tmp_path / "o"
    code, output = explain(a, b, "--out", out)
    assert code == 0, output
    records = {json.loads((out / d / "result.json").read_text())["source"]: d
               for d in json.loads((out / "results.json").read_text())["images"]}
    assert set(records) == {str(a.resolve()), str(b.resolve())} and len(set(records.values())) == 2
    # run again with the other order: each image finds its own folder again (resume), nothing recomputed
    stamps = {d: (out / d / "result.json").stat().st_mtime_ns for d in records.values()}
    assert explain(b, a, "--out", out)[0] == 0
    assert {d: (out / d / "result.json").stat().st_mtime_ns for d in records.values()} == stamps


def test_a_result_folder_with_a_user_file_added_is_never_replaced(tmp_path: Path) -> None:
    image, out = _image(tmp_path / "cat.png"), tmp_path / "o"
    assert explain(image, "--out", out)[0] == 0
    (out / "cat" / "my-notes.txt").write_text("mine")
    code, output = explain(image, "--out", out, "--no-resume")
    assert code == 0, output
    assert (out / "cat" / "my-notes.txt").read_text() == "mine" and (out / "cat" / "gradcam.npy").is_file()
    assert json.loads((out / "results.json").read_text())["images"][0].startswith("cat-")


# ------------------------------------------------------------------------------------ 2. rich markup
def test_markup_in_paths_is_printed_verbatim(tmp_path: Path) -> None:
    code, output = explain(tmp_path / "nosuch[/x]" / "a.jpg", "--out", tmp_path / "o")
    assert code == 2 and "nosuch[/x]" in output and "error:" in output
    folder = tmp_path / "in"
    _image(folder / "good.png")
    (folder / "bad[").mkdir()
    (folder / "bad[" / "x][bold].jpg").write_bytes(b"\xff\xd8\xff garbage")  # a path with "[/" and markup
    out = tmp_path / "o"
    code, output = explain(folder, "--out", out)
    assert code == 1, output  # one image skipped
    assert "bad[/x][bold].jpg" in output.replace("\n", "")
    assert (out / "index.html").is_file() and (out / "results.json").is_file()


# ---------------------------------------------------------------------- 3. names of the run's own files
def test_images_named_like_the_run_files(tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "o"
    for name in ("results.json.png", "index.html.png", "INDEX.HTML.png"):
        _image(folder / name)
    code, output = explain(folder, "--out", out)
    assert code == 0, output
    assert (out / "results.json").is_file() and (out / "index.html").is_file()
    assert len(json.loads((out / "results.json").read_text())["images"]) == 3
    assert _leftovers(out) == []


def test_a_user_index_html_in_out_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "index.html").write_text("<h1>my site</h1>")
    code, output = explain(_image(tmp_path / "a.png"), "--out", out)
    assert code == 2 and "index.html" in output and "not written by convlens" in output
    assert sorted(os.listdir(out)) == ["index.html"] and (out / "index.html").read_text() == "<h1>my site</h1>"


# ----------------------------------------------------------------- 4. exit 2 and one line, nothing written
def _bad_weights(tmp_path: Path) -> list[str]:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1), "head.weight": torch.zeros(3, 6)}, other)
    return [str(empty), str(other)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("out-is-file", "exists and is not a folder"),
        ("out-under-file", "is not a folder"),
        ("device-tpu", "--device 'tpu'"),
        ("n-masks-float", "rise.n_masks: expected an integer, got '2.5'"),
        ("n-masks-text", "rise.n_masks: expected an integer, got 'abc'"),
        ("inv-perplexity", "inv.perplexity: must be > 0"),
        ("inv-cluster-range", "inv.cluster_range: must be >= 2"),
        ("empty-weights", "is empty (0 bytes)"),
        ("wrong-weights", "missing key(s): features.0.weight"),
        ("score", "gradcam.score: expected 'logit' | 'softmax' | 'sigmoid'"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path: Path, case: str, message: str) -> None:
    image = _image(tmp_path / "a.png")
    out = tmp_path / "o"
    empty, other = _bad_weights(tmp_path)
    args = {
        "out-is-file": ["--out", str(image)],
        "out-under-file": ["--out", str(image / "sub")],
        "device-tpu": ["--device", "tpu"],
        "n-masks-float": ["--methods", "rise", "--param", "rise.n_masks=2.5"],
        "n-masks-text": ["--methods", "rise", "--param", "rise.n_masks=abc"],
        "inv-perplexity": ["--methods", "inv", "--param", "inv.perplexity=0"],
        "inv-cluster-range": ["--methods", "inv", "--param", "inv.cluster_range=1,8"],
        "empty-weights": ["--weights", empty],
        "wrong-weights": ["--weights", other],
        "score": ["--param", "score=probability"],
    }[case]
    before = _snapshot(tmp_path)
    code, output = explain(image, "--out", out, *args)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and message in " ".join(output.split()), output
    assert _snapshot(tmp_path) == before and not out.exists()


def test_out_of_range_sise_mu_names_the_range(tmp_path: Path) -> None:
    code, output = explain(_image(tmp_path / "a.png"), "--out", tmp_path / "o", "--methods", "sise",
                           "--param", "sise.mu=2")
    assert code == 2 and "sise.mu: must be [0, 1], got 2.0" in output and not (tmp_path / "o").exists()


def test_resnet18_weights_for_the_default_model_name_the_keys(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    code, output = explain(_image(tmp_path / "a.png"), "--out", tmp_path / "o", "--model", "efficientnet_lite0",
                           "--weights", path)
    text = " ".join(output.split())
    assert code == 2 and "do not fit efficientnet_lite0" in text, output
    assert "missing key(s): conv_stem.weight" in text and "unexpected key(s): conv1.weight" in text
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ 5. never read the outputs
def test_rerun_on_the_current_folder_never_reads_its_outputs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "a.png")
    for _ in range(2):
        code, output = explain(".")  # default --out out/explain, inside "."
        assert code == 0, output
    summary = json.loads((tmp_path / "out" / "explain" / "results.json").read_text())
    assert summary["images"] == ["a"]
    assert sorted(os.listdir(tmp_path / "out" / "explain")) == ["a", "index.html", "results.json"]
    # an earlier run into another folder is not read either
    assert explain(".", "--out", "other")[0] == 0
    assert json.loads((tmp_path / "other" / "results.json").read_text())["images"] == ["a"]


# ------------------------------------------------------------------------------- 6. clear API errors
@pytest.mark.parametrize("bad", [3.7, True, "3.7x", [1.5], torch.tensor([0.0])])
def test_api_targets_of_the_wrong_type_say_what_is_accepted(tiny_cnn, tiny_images, bad) -> None:
    from convlens.methods.gradcam import GradCAM

    error = ValueError if isinstance(bad, str) else TypeError
    with pytest.raises(error, match=r"targets must be|unknown class name|class .* given by name"):
        GradCAM(tiny_cnn).explain(tiny_images[:1], targets=bad)


def test_api_five_channel_input_says_what_the_model_takes(tiny_cnn) -> None:
    from convlens.inv import INV
    from convlens.methods.gradcam import GradCAM

    x = torch.randn(1, 5, 32, 32)
    with pytest.raises(ValueError, match=r"takes 3-channel images .*block1\.0.* got 5 channels"):
        GradCAM(tiny_cnn).explain(x)
    with pytest.raises(ValueError, match="takes 3-channel images"):
        INV(tiny_cnn, layers="convs").explain(x)


# ------------------------------------------------------------- 7. what a killed run left is cleared
def test_leftovers_of_a_killed_run_are_removed_and_only_those(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    for name in (temporary_name(), temporary_name("old")):
        (out / name).mkdir()
        (out / name / "input.png").write_bytes(b"x")
    (out / temporary_name(suffix=".tmp")).write_text("{")
    users = [".convlens-notes", ".convlens-tmp-abc12345", ".convlens-tmp-notes", ".holiday.abcd1234",
             ".results.json.tmp"]  # the user's hidden files, some named like convlens's temporaries
    for name in users:
        (out / name).write_text("mine")
    code, output = explain(_image(tmp_path / "a.png"), "--out", out)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == users


_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from test_explain_safety import tiny_model, TINY
    from convlens.models import register_model
    import convlens.runners.explain as runner
    register_model(TINY, tiny_model)
    original = runner.explain_image
    calls = []
    def explain_then_die(path, loaded, explainers, settings, directory):
        calls.append(path)
        record = original(path, loaded, explainers, settings, directory)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # after writing the second image's files, before the rename
        return record
    runner.explain_image = explain_then_die
    from convlens.cli.main import app
    app(["explain", sys.argv[2], "--model", TINY, "--out", sys.argv[3]])
""")


def test_sigkill_then_rerun_resumes_and_clears_the_temporaries(tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "o"
    for i in range(3):
        _image(folder / f"img{i}.png", i)
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(folder), str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "img0" / "result.json").is_file() and not (out / "img1").exists()
    assert _leftovers(out), "the kill should have left a temporary folder behind"
    first = (out / "img0" / "result.json").stat().st_mtime_ns
    code, output = explain(folder, "--out", out)
    assert code == 0, output
    assert _leftovers(out) == [] and (out / "img0" / "result.json").stat().st_mtime_ns == first  # resumed
    assert json.loads((out / "results.json").read_text())["images"] == ["img0", "img1", "img2"]


def test_no_resume_recomputes(tmp_path: Path, monkeypatch) -> None:
    """Counted explanations, not file times: a resumed run explains nothing, --no-resume explains the image
    again (to the same bytes), whatever the file system's time resolution."""
    import convlens.runners.explain as explain_runner

    image, out = _image(tmp_path / "a.png"), tmp_path / "o"
    original, explained = explain_runner.explain_image, []

    def counted(*args, **kwargs):
        explained.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(explain_runner, "explain_image", counted)
    assert explain(image, "--out", out)[0] == 0 and explained == [image]
    first = (out / "a" / "gradcam.npy").read_bytes()
    assert explain(image, "--out", out)[0] == 0 and explained == [image]  # resumed: nothing explained
    assert explain(image, "--out", out, "--no-resume")[0] == 0 and explained == [image, image]
    assert (out / "a" / "gradcam.npy").read_bytes() == first and _leftovers(out) == []


def test_ctrl_c_exits_130_and_keeps_finished_images(tmp_path: Path, monkeypatch) -> None:
    import convlens.runners.explain as explain_runner

    folder, out = tmp_path / "in", tmp_path / "o"
    for i in range(3):
        _image(folder / f"img{i}.png", i)
    original, calls = explain_runner.explain_image, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(explain_runner, "explain_image", interrupted)
    code, output = explain(folder, "--out", out)
    assert code == 130 and "interrupted" in output
    assert (out / "img0" / "result.json").is_file() and not (out / "img1").exists() and _leftovers(out) == []


# ------------------------------------------------------------------------------ 8 and concurrency
def test_a_second_run_waits_for_the_first(tmp_path: Path) -> None:
    from convlens.runners.explain import ExplainConfig, run_explain

    image, out = _image(tmp_path / "a.png"), tmp_path / "o"
    out.mkdir()
    waited, results = [], []

    class Progress:
        def start(self, images): ...
        def image_done(self): ...
        def forwards(self, count): ...
        def skipped(self, message): ...
        def waiting(self, folder):
            waited.append(folder)

    with OutputLock(out):  # another run holds the folder
        worker = threading.Thread(target=lambda: results.append(
            run_explain(ExplainConfig([str(image)], model=TINY, out=out), Progress())))
        worker.start()
        deadline = time.monotonic() + 900  # a hang guard only: the loop ends once the run says it waits
        while not waited and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.is_alive() and waited == [out] and not (out / "a").exists()  # waiting, nothing written yet
    worker.join(timeout=900)
    assert not worker.is_alive()
    assert waited == [out] and results[0].exit_code == 0 and (out / "a" / "gradcam.npy").is_file()
    assert not (out / OutputLock.NAME).exists()


def test_two_identical_runs_at_once_both_succeed_and_agree(tmp_path: Path) -> None:
    """Two identical runs into one folder take turns: every image is explained once (the second run resumes
    from the first's folders), and the maps equal, bitwise, those of a run alone in a folder of its own."""
    folder, out, alone = tmp_path / "in", tmp_path / "o", tmp_path / "alone"
    for i in range(4):
        _image(folder / f"img{i}.png", i)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from test_explain_safety import tiny_model, TINY
        from convlens.models import register_model
        register_model(TINY, tiny_model)
        import convlens.runners.explain as runner
        explain_image = runner.explain_image

        def logged(path, *args):  # one line per image actually explained, by either run
            with open(sys.argv[4], "a") as log:
                log.write(path.name + "\\n")
            return explain_image(path, *args)

        runner.explain_image = logged
        from convlens.cli.main import app
        app(["explain", sys.argv[2], "--model", TINY, "--out", sys.argv[3], "--methods", "gradcam,rise",
             "--param", "rise.n_masks=50"])
    """))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    log, log_alone = tmp_path / "computed.txt", tmp_path / "computed_alone.txt"
    command = [sys.executable, str(script), str(Path(__file__).parent), str(folder), str(out), str(log)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=900)[0].decode() for run in runs]  # hang guards only
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sorted(log.read_text().split()) == [f"img{i}.png" for i in range(4)]  # each image once
    command_alone = [*command[:4], str(alone), str(log_alone)]
    assert subprocess.run(command_alone, capture_output=True, env=env, timeout=900).returncode == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["images"] == [f"img{i}" for i in range(4)]
    for name in summary["images"]:
        record = json.loads((out / name / "result.json").read_text())
        assert [r["method"] for r in record["results"]] == ["gradcam", "rise"]
        for method in ("gradcam", "rise"):
            together, by_itself = np.load(out / name / f"{method}.npy"), np.load(alone / name / f"{method}.npy")
            assert together.shape == (16, 16) and together.tobytes() == by_itself.tobytes()
    assert _leftovers(out) == []


# ------------------------------------------------------------------------------- pages and permissions
def test_class_names_are_inert_in_the_page(tmp_path: Path) -> None:
    import html.parser

    class Tags(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs) -> None:
            self.tags.append(tag)

    out = tmp_path / "o"
    code, output = explain(_image(tmp_path / "a.png"), "--out", out, "--target", "1")
    assert code == 0, output
    page = (out / "index.html").read_text()
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        out = tmp_path / "o"
        code, output = explain(_image(tmp_path / "a.png"), "--out", out, "--methods", "gradcam,inv",
                               "--param", "inv.embedding=pca")
    finally:
        os.umask(previous)
    assert code == 0, output
    for folder in (out, out / "a", out / "a" / "inv"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask, folder
    for file in (out / "index.html", out / "results.json", out / "a" / "result.json", out / "a" / "inv" / "inv.json",
                 out / "a" / "inv" / "index.html"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file
