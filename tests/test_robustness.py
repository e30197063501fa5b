"""Bad input to the command line (issue 13): every case ends in one line on stderr, exit code 2 for a usage error and
1 for a failure, no traceback (unless --debug / REASSEMBLY_DEBUG=1) and no partial output.

The tests run the CLI in-process (click's CliRunner) on a tiny CIFAR-10 / Fashion-MNIST made here, so that they are
fast and need no downloaded data.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from reassembly.cli import cli
from reassembly.data import balanced_sample
from reassembly.data.dataset import ImageDataset

PER_CLASS = 3  # test images per class in the tiny datasets


def _jpeg(rng) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A folder with a tiny cifar10-jpg.zip (PER_CLASS test images per class) and a tiny Fashion-MNIST."""
    from reassembly.data.sources import CIFAR10_CLASSES

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(root / "cifar10-jpg.zip", "w") as archive:
        for name in CIFAR10_CLASSES:
            for i in range(PER_CLASS):
                archive.writestr(f"test/{name}/{i:04d}.jpg", _jpeg(rng))
    fashion = root / "fashion-mnist"
    fashion.mkdir()
    _idx(fashion / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10 * PER_CLASS, 28, 28)))
    _idx(fashion / "t10k-labels-idx1-ubyte", np.repeat(np.arange(10), PER_CLASS))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """cifar_resnet20 weights for 10 classes (random, but a real checkpoint)."""
    from reassembly import create_model, save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_checkpoint(create_model("cifar_resnet20"), path)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REASSEMBLY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REASSEMBLY_DEBUG", "")  # recorded, so that --debug's setting is undone after the test
    monkeypatch.delenv("REASSEMBLY_DEBUG")
    monkeypatch.delenv("REASSEMBLY_DATA", raising=False)


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not _progress_or_note(line)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _progress_or_note(line: str) -> bool:
    """A decoding progress bar (first use of a dataset) or a note; neither is the error."""
    return line.startswith(("note: ", "decoding "))


def assert_ok(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- sizes and counts: 0 and negatives are usage errors (exit 2) --------------------------------------------------

NON_POSITIVE = [
    ("eval", "--batch-size", "0"), ("eval", "--image-size", "0"), ("eval", "--num-classes", "0"),
    ("eval", "--channels", "0"), ("eval", "--limit", "0"), ("eval", "--limit", "-5"),
    ("info", "--num-classes", "0"), ("info", "--depth", "0"), ("dissect", "--num-classes", "-1"),
    ("similarity", "--batch-size", "0"), ("similarity", "--probe-size", "0"), ("similarity", "--image-size", "0"),
    ("partition", "--k", "0"), ("stitch", "--probe-size", "0"), ("train", "--epochs", "0"),
    ("train", "--batch-size", "0"), ("search", "--top-k", "0"), ("search", "--batch-size", "0"),
    ("zoo train", "--epochs", "0"), ("zoo train", "--threads", "0"), ("nas show", "--num-classes", "0"),
]
BASE_ARGS = {
    "eval": ["--model", "resnet20_cifar5", "--data", "cifar10[0:5]"],
    "info": ["cifar_resnet20"], "dissect": ["cifar_resnet20"],
    "similarity": ["--zoo", "resnet20_cifar5", "--data", "cifar10[0:5]", "--out", "OUT"],
    "partition": ["OUT"], "stitch": ["--blocks", "resnet20_cifar5:1-4", "--data", "cifar10[0:5]", "--out", "OUT"],
    "train": ["OUT", "--data", "cifar10[0:5]"], "search": ["DIR", "--data", "cifar10[0:5]"],
    "zoo train": ["resnet20_cifar5", "--out", "OUT"], "nas show": ["DARTS_V2"],
}


@pytest.mark.parametrize("verb, option, value", NON_POSITIVE, ids=[" ".join(c) for c in NON_POSITIVE])
def test_non_positive_sizes_and_counts_are_usage_errors(tmp_path, verb, option, value):
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else str(tmp_path) if a == "DIR" else a for a in BASE_ARGS[verb]]
    result = invoke(*verb.split(), *args, option, value)
    assert_one_line_error(result, 2, f"'{option}'", "x>=1")
    assert not out.exists()


# --- output paths: refused before any work, written atomically and before printing ---------------------------------

BAD_OUTPUTS = [("-", "standard output"), ("DIR", "is a directory"), ("FILE/out.json", "is a file, not a folder")]


@pytest.mark.parametrize("verb", [["info", "cifar_resnet20"], ["dissect", "cifar_resnet20"],
                                  ["eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]"]],
                         ids=["info", "dissect", "eval"])
@pytest.mark.parametrize("target, message", BAD_OUTPUTS, ids=["dash", "directory", "under-a-file"])
def test_bad_json_paths_are_refused_up_front(tmp_path, verb, target, message):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "DIR").mkdir()
    path = target if target == "-" else str(tmp_path / target)
    result = invoke(*verb, "--json", path)
    assert_one_line_error(result, 2, "'--json'", message)
    assert result.stdout == ""  # nothing ran: no table, no result that the JSON then lost
    assert files_in(tmp_path) == ["DIR", "FILE"] and files_in(tmp_path / "DIR") == []


def _failing_replace(monkeypatch):
    import reassembly.io

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(reassembly.io.os, "replace", refuse)


def test_eval_json_write_failure_is_one_line_and_leaves_nothing(tmp_path, data_root, monkeypatch):
    _failing_replace(monkeypatch)
    out = tmp_path / "results"
    out.mkdir()
    result = invoke("eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]", "--data-root", data_root,
                    "--json", out / "eval.json")
    assert_one_line_error(result, 1, "Permission denied", "eval.json")
    assert files_in(out) == []  # no partial file and no temporary left behind


def test_eval_writes_the_json_before_printing(tmp_path, data_root, monkeypatch):
    import click

    echoed = []

    def echo_checking(message=None, *args, **kwargs):
        echoed.append((message, (tmp_path / "eval.json").is_file()))

    monkeypatch.setattr(click, "echo", echo_checking)
    result = invoke("eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]", "--data-root", data_root,
                    "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    top1 = [written for message, written in echoed if message and "top-1" in message]
    assert top1 == [True]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["images"] == 5 * PER_CLASS and record["sample"] is None


def test_info_json_write_failure_is_one_line(tmp_path, monkeypatch):
    _failing_replace(monkeypatch)
    result = invoke("info", "cifar_resnet20", "--json", tmp_path / "info.json")
    assert_one_line_error(result, 1, "Permission denied", "info.json")
    assert files_in(tmp_path) == []


# --- eval: weights, sampling, channels, class counts ----------------------------------------------------------------

def test_eval_refuses_random_weights_unless_asked(data_root):
    args = ["eval", "--model", "cifar_resnet20", "--data", "cifar10", "--data-root", data_root]
    assert_one_line_error(invoke(*args), 2, "no weights to score", "--checkpoint", "--random-weights")
    assert "top-1" in assert_ok(invoke(*args, "--random-weights")).stdout


def test_eval_limit_is_a_seeded_class_balanced_sample(tmp_path, data_root):
    args = ["eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]", "--data-root", data_root, "--limit", "5"]
    first = assert_ok(invoke(*args, "--json", tmp_path / "a.json"))
    assert "5 images: a class-balanced sample (seed 0)" in first.stdout
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["sample"] == {"images": 5, "of": 5 * PER_CLASS, "seed": 0, "class_balanced": True}
    again = assert_ok(invoke(*args))
    assert again.stdout == first.stdout.replace(f"wrote {tmp_path / 'a.json'}\n", "")


def test_balanced_sample_spreads_over_the_classes():
    labels = torch.arange(4).repeat_interleave(torch.tensor([50, 30, 2, 18]))  # class-sorted, as the splits are
    data = ImageDataset(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels, ("a", "b", "c", "d"), "toy")
    sample = balanced_sample(data, 10, seed=3)
    assert sorted(torch.bincount(sample.labels, minlength=4).tolist()) == [2, 2, 3, 3]
    counts = torch.bincount(balanced_sample(data, 40, seed=0).labels, minlength=4).tolist()
    assert counts[2] == 2 and sorted(counts) == [2, 12, 13, 13]  # the small class gives all it has
    assert torch.equal(balanced_sample(data, 10, seed=3).labels, sample.labels)
    assert len(balanced_sample(data, 1000)) == len(data)


def test_eval_channel_mismatch_suggests_a_fix_that_works(data_root, weights):
    args = ["eval", "--model", "cifar_resnet20", "--checkpoint", weights, "--data", "fashion_mnist",
            "--data-root", data_root]
    assert_one_line_error(invoke(*args), 1, "takes 3-channel images", "fashion_mnist has 1",
                          "--channels 3 --image-size 32")
    assert "top-1" in assert_ok(invoke(*args, "--channels", "3", "--image-size", "32")).stdout


def test_eval_class_count_mismatch_suggests_a_fix_that_works(data_root, weights):
    args = ["eval", "--model", "cifar_resnet20", "--checkpoint", weights, "--data-root", data_root]
    line = assert_one_line_error(invoke(*args, "--data", "cifar10[0:5]"), 1, "trained for 10 classes",
                                 "cifar10[0:5] has 5", "data with 10 classes")
    assert "--num-classes" not in line  # it would build a 10-class model that then fails on 5-class data
    assert_ok(invoke(*args, "--data", "cifar10"))


def test_eval_at_an_image_size_the_model_cannot_take(data_root):
    assert_one_line_error(invoke("eval", "--model", "vit_cifar5", "--data", "cifar10[0:5]", "--data-root", data_root,
                                 "--image-size", "64"), 1, "vit_cifar5 does not run on 3x64x64 images",
                          "pass --image-size 32")


def test_info_class_count_suggestion_works(weights):
    assert_one_line_error(invoke("info", "cifar_resnet20", "--num-classes", "5", "--checkpoint", weights), 1,
                          "trained for 10 classes", "--num-classes 10")
    assert_ok(invoke("info", "cifar_resnet20", "--num-classes", "10", "--checkpoint", weights))


def test_info_input_size_with_the_wrong_channels(tmp_path):
    result = invoke("info", "cifar_resnet20", "--input-size", "1,32,32", "--json", tmp_path / "info.json")
    assert_one_line_error(result, 1, "takes 3-channel images", "--input-size 3,32,32")
    assert files_in(tmp_path) == []


# --- datasets: decode cache, REASSEMBLY_DATA --------------------------------------------------------------------------

def test_corrupt_decode_cache_is_decoded_again(tmp_path, data_root):
    args = ["eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]", "--data-root", data_root]
    first = assert_ok(invoke(*args))
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    cached[0].write_bytes(b"\x00garbage" * 10)
    second = assert_ok(invoke(*args))
    assert second.stdout == first.stdout
    assert "decode cache" in second.stderr and "unreadable" in second.stderr
    with np.load(cached[0]) as data:  # rebuilt
        assert len(data["labels"]) == 10 * PER_CLASS


def test_unwritable_cache_directory_is_a_note_not_a_crash(tmp_path, data_root):
    (tmp_path / "not-a-folder").write_text("")
    result = invoke("eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]", "--data-root", data_root,
                    env={"REASSEMBLY_CACHE": str(tmp_path / "not-a-folder" / "cache")})
    assert "top-1" in assert_ok(result).stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "cannot write the decode cache" in notes[0] and "REASSEMBLY_CACHE" in notes[0]


def test_reassembly_data_naming_a_missing_folder(tmp_path):
    result = invoke("eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]",
                    env={"REASSEMBLY_DATA": str(tmp_path / "missing")})
    assert_one_line_error(result, 1, f"REASSEMBLY_DATA={tmp_path / 'missing'} is not a folder")


def test_reassembly_data_naming_an_empty_folder_says_where_it_looks_instead(tmp_path, data_root, monkeypatch):
    import shutil

    from reassembly.data import sources

    fallback = tmp_path / "cache" / "data"  # the last place searched: the cache's data folder
    fallback.mkdir(parents=True)
    shutil.copy(data_root / "cifar10-jpg.zip", fallback)
    checkout = tmp_path / "a" / "checkout"
    checkout.mkdir(parents=True)
    monkeypatch.setattr(sources, "REPO_ROOT", checkout)  # no ../shared/data beside it
    monkeypatch.chdir(checkout)
    (tmp_path / "empty").mkdir()
    result = invoke("eval", "--model", "resnet20_cifar5", "--data", "cifar10[0:5]",
                    env={"REASSEMBLY_DATA": str(tmp_path / "empty")})
    assert "top-1" in assert_ok(result).stdout
    assert f"note: cifar10-jpg.zip is not in REASSEMBLY_DATA={tmp_path / 'empty'}; using {fallback}" in result.stderr


# --- checkpoints and convert --------------------------------------------------------------------------------------------

def test_random_bytes_are_not_called_an_unsafe_pickle(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    path.write_bytes(b"\xea" + path.read_bytes()[1:])  # not the pickle opcode 0x80
    line = assert_one_line_error(invoke("info", "cifar_resnet20", "--checkpoint", path), 1,
                                 "is not a torch checkpoint")
    assert "trust-pickle" not in line and "unpickle" not in line
    assert_one_line_error(invoke("convert", path, tmp_path / "out.safetensors", "--trust-pickle"), 1,
                          "is not a torch checkpoint")
    assert files_in(tmp_path) == ["junk.pt"]


def test_convert_into_a_bad_place(tmp_path):
    from reassembly import create_model

    source = tmp_path / "w.pt"
    torch.save(create_model("cifar_resnet20").state_dict(), source)
    (tmp_path / "FILE").write_text("")
    assert_one_line_error(invoke("convert", source, tmp_path / "FILE" / "w.safetensors", "--trust-pickle"), 2,
                          "'DST'", "is a file, not a folder")
    assert_one_line_error(invoke("convert", source, tmp_path, "--trust-pickle"), 2, "'DST'", "is a directory")
    assert files_in(tmp_path) == ["FILE", "w.pt"]


def test_convert_write_failure_is_one_line(tmp_path, monkeypatch):
    from reassembly import create_model

    source = tmp_path / "w.pt"
    torch.save(create_model("cifar_resnet20").state_dict(), source)
    out = tmp_path / "out"
    out.mkdir()
    _failing_replace(monkeypatch)
    assert_one_line_error(invoke("convert", source, out / "w.safetensors", "--trust-pickle"), 1,
                          "cannot write", "Permission denied")
    assert files_in(out) == []


# --- model names, cuts, zoo filter, --debug ------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["info", "dissect"])
def test_shipped_zoo_names_work_with_their_weights(verb):
    result = assert_ok(invoke(verb, "resnet20_cifar5"))
    assert "269,397" in result.stdout  # 5 classes: the shipped model, not the 10-class architecture (269,722)


def test_eval_takes_a_shipped_name_without_pretrained(data_root):
    args = ["--data", "cifar10[0:5]", "--data-root", data_root]
    plain = assert_ok(invoke("eval", "--model", "resnet20_cifar5", *args))
    assert plain.stdout == assert_ok(invoke("eval", "--model", "resnet20_cifar5", "--pretrained", *args)).stdout


@pytest.mark.parametrize("cuts, code, needles", [
    (",", 2, ["'--cuts'", "names no module"]),
    ("layer3,layer1", 1, ["in the order they run", "`layer1`", "`layer3`"]),
    ("layer1,layer1", 1, ["in the order they run"]),
], ids=["empty", "out-of-order", "repeated"])
def test_bad_cuts(tmp_path, cuts, code, needles):
    result = invoke("dissect", "cifar_resnet20", "--cuts", cuts, "--json", tmp_path / "chain.json")
    assert_one_line_error(result, code, *needles)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["zoo", "list", "--filter", "nomatch*"], "no shipped model matches --filter 'nomatch*'"),
    (["zoo", "list", "--archs", "--filter", "nomatch*"], "no architecture matches --filter 'nomatch*'"),
])
def test_zoo_filter_matching_nothing(args, message):
    line = assert_one_line_error(invoke(*args), 1, message)
    assert "shipped yet" not in line


def test_debug_flag_shows_the_traceback():
    assert_one_line_error(invoke("info", "no_such_model"), 1, "unknown model 'no_such_model'")
    result = invoke("--debug", "info", "no_such_model")
    assert result.exit_code == 1 and "no_such_model" in str(result.exception)
    assert not isinstance(result.exception, SystemExit)  # raised through: the caller gets the traceback


# --- budgets, K, class selections ----------------------------------------------------------------------------------

SPLIT_CIFAR = Path(__file__).resolve().parents[1] / "results" / "split-cifar"  # shipped similarity + partition


@pytest.mark.parametrize("bound, needles", [
    (["--params", "10K"], ["no network fits --params 10.00K", "smallest network", "148.51K parameters"]),
    (["--macs", "1K"], ["no network fits --macs 1.00K", "smallest network", "15.30M MACs"]),
], ids=["params", "macs"])
def test_a_budget_nothing_fits_names_the_smallest_cost(tmp_path, bound, needles):
    result = invoke("search", SPLIT_CIFAR, "--data", "digits", *bound, "--out", tmp_path / "s.json")
    assert_one_line_error(result, 1, *needles)
    assert files_in(tmp_path) == []


def test_k_larger_than_the_shortest_model_is_refused(tmp_path):
    result = invoke("partition", SPLIT_CIFAR, "--k", "50", "--out", tmp_path / "p.json")
    assert_one_line_error(result, 1, "vit_cifar5 has only 6 body nodes", "--k 6 or fewer")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("spec, needles", [
    ("cifar10[11:12]", ["asks for class 11", "cifar10 has 10 classes"]),
    ("cifar10[0,99]", ["asks for class 99"]),
    ("cifar10[3:3]", ["names no class", "cifar10[0:5]"]),
    ("cifar10[]", ["names no class"]),
    ("cifar10[-1]", ["distinct, non-negative"]),
    ("cifar10[1,1]", ["distinct, non-negative"]),
], ids=["range-past-the-end", "index-past-the-end", "empty-range", "empty-list", "negative", "repeated"])
def test_class_selections_that_name_no_real_class(tmp_path, data_root, spec, needles):
    result = invoke("eval", "--model", "resnet20_cifar5", "--data", spec, "--data-root", data_root,
                    "--json", tmp_path / "out" / "e.json")
    assert_one_line_error(result, 1, *needles)
    assert not (tmp_path / "out").exists()


# --- misspelled names: the closest names are suggested ----------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["info", "cifar_resnt20"], ["unknown model 'cifar_resnt20'", "did you mean cifar_resnet20"]),
    (["dissect", "resnet20_cifar"], ["unknown model 'resnet20_cifar'", "did you mean resnet20_cifar5"]),
    (["eval", "--model", "resnet20_cifr5", "--data", "cifar10"], ["unknown model", "did you mean resnet20_cifar5"]),
    (["eval", "--model", "resnet20_cifar5", "--data", "cifr10[0:5]"], ["unknown dataset 'cifr10'",
                                                                        "did you mean cifar10?"]),
    (["similarity", "--zoo", "resnet20_cifar5,vgg11_cifr5", "--data", "cifar10", "--out", "OUT"],
     ["no shipped model named vgg11_cifr5", "did you mean vgg11_cifar5"]),
    (["stitch", "--blocks", "resnet20_cifar5:1-4,vgg11_cifar:3-9", "--data", "cifar10[0:5]", "--out", "OUT"],
     ["no shipped model named 'vgg11_cifar'", "did you mean vgg11_cifar5"]),
    (["zoo", "train", "resnet20_cifr5", "--out", "OUT"], ["no zoo recipe named 'resnet20_cifr5'",
                                                          "did you mean resnet20_cifar5"]),
    (["nas", "show", "DARTS_V3"], ["unknown genotype 'DARTS_V3'", "did you mean DARTS_V2"]),
    (["search", SPLIT_CIFAR, "--data", "digits", "--params", "0.5M", "--proxy", "naswt", "--out", "OUT"],
     ["unknown proxy 'naswt'", "did you mean naswot, naswot_official?"]),
], ids=["info", "dissect", "eval-model", "eval-data", "similarity-zoo", "stitch-blocks", "zoo-train", "nas-genotype",
        "search-proxy"])
def test_misspelled_names_suggest_the_closest(tmp_path, args, needles):
    out = tmp_path / "out"
    result = invoke(*[out if a == "OUT" else a for a in args])
    assert_one_line_error(result, 1, *needles)
    assert not out.exists()


# --- checkpoints: truncated, corrupt, empty, a directory, unsafe pickles, other architectures ------------------------

def _broken_checkpoints(folder: Path, weights: Path) -> dict[str, Path]:
    good = weights.read_bytes()
    files = {"truncated": ("w.safetensors", good[: len(good) // 2]),
             "corrupt-header": ("w.safetensors", good[:8] + b"\xff" * 64 + good[72:]),
             "zero-bytes": ("w.safetensors", b""), "zero-bytes-pt": ("w.pt", b""),
             "random-pt": ("w.pt", b"\xea" + bytes(range(256)) * 8)}
    paths = {}
    for kind, (name, data) in files.items():
        (folder / kind).mkdir()
        paths[kind] = folder / kind / name
        paths[kind].write_bytes(data)
    return paths


@pytest.mark.parametrize("kind, needles", [
    ("truncated", ["is not a readable safetensors file"]),
    ("corrupt-header", ["is not a readable safetensors file"]),
    ("zero-bytes", ["is empty (0 bytes)"]),
    ("zero-bytes-pt", ["is empty (0 bytes)"]),
    ("random-pt", ["is not a torch checkpoint"]),
])
def test_broken_checkpoint_files(tmp_path, data_root, weights, kind, needles):
    path = _broken_checkpoints(tmp_path, weights)[kind]
    out = tmp_path / "out"
    result = invoke("eval", "--model", "cifar_resnet20", "--checkpoint", path, "--data", "cifar10",
                    "--data-root", data_root, "--json", out / "e.json")
    assert_one_line_error(result, 1, str(path), *needles)
    if path.suffix == ".pt":
        convert_needles = needles
    else:  # convert reads torch files only
        convert_needles = ["is empty (0 bytes)"] if kind == "zero-bytes" else ["is not a torch checkpoint"]
    result = invoke("convert", path, out / "w.safetensors", "--trust-pickle")
    assert_one_line_error(result, 1, str(path), *convert_needles)
    assert not out.exists()


def test_a_directory_where_a_checkpoint_file_is_expected(tmp_path, data_root):
    (tmp_path / "w.safetensors").mkdir()
    for args in (["eval", "--model", "cifar_resnet20", "--data", "cifar10", "--data-root", data_root, "--checkpoint"],
                 ["info", "cifar_resnet20", "--checkpoint"], ["convert", "--trust-pickle"]):
        option = "'--checkpoint'" if "--checkpoint" in args else "'SRC'"
        tail = [tmp_path / "out.safetensors"] if args[0] == "convert" else []
        assert_one_line_error(invoke(*args, tmp_path / "w.safetensors", *tail), 2, option, "is a directory")
    assert files_in(tmp_path) == ["cache", "w.safetensors"] or files_in(tmp_path) == ["w.safetensors"]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling it creates the marker file


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, data_root):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _RunsCode(marker)}, path)
    assert not marker.exists()
    eval_args = ["eval", "--model", "cifar_resnet20", "--data", "cifar10", "--data-root", data_root]
    for args in (eval_args + ["--checkpoint", path], ["info", "cifar_resnet20", "--checkpoint", path],
                 ["dissect", "cifar_resnet20", "--checkpoint", path]):
        assert_one_line_error(invoke(*args), 1, f"refusing {path}", "can run code", "it names", "--trust-pickle")
    assert_one_line_error(invoke("convert", path, tmp_path / "w.safetensors"), 2, "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "w.safetensors").exists()


def test_a_checkpoint_for_another_architecture_names_the_keys_or_shapes(tmp_path, data_root):
    from reassembly import create_model, save_checkpoint

    other = save_checkpoint(create_model("cifar_resnet32"), tmp_path / "resnet32.safetensors")
    args = ["eval", "--model", "cifar_resnet20", "--data", "cifar10", "--data-root", data_root, "--checkpoint"]
    assert_one_line_error(invoke(*args, other), 1, "does not fit model cifar_resnet20", "72 unexpected keys",
                          "layer1.3.", "right architecture")
    state = create_model("cifar_resnet20").state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 3, 3)
    wider = save_checkpoint(state, tmp_path / "wider.safetensors")
    line = assert_one_line_error(invoke(*args, wider), 1, "shape mismatch",
                                 "conv1.weight (32, 3, 3, 3) vs (16, 3, 3, 3)")
    assert "classes" not in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_refused(tmp_path, data_root, value):
    from reassembly import create_model, save_checkpoint

    state = create_model("cifar_resnet20").state_dict()
    state["layer2.0.conv1.weight"][3, 1, 0, 0] = value
    path = save_checkpoint(state, tmp_path / "diverged.safetensors")
    assert_one_line_error(invoke("eval", "--model", "cifar_resnet20", "--data", "cifar10", "--data-root", data_root,
                                 "--checkpoint", path), 1, "NaN or infinite values in 1 of its",
                          "layer2.0.conv1.weight", "load an earlier checkpoint")


def test_a_saved_network_with_nan_weights_is_refused(tmp_path, data_root):
    from reassembly.stitch import build_network
    from reassembly.stitch.build import pretrained_block
    from reassembly.stitch.io import save_net

    net = build_network([pretrained_block("resnet20_cifar5", 1, 4)], num_classes=5)
    with torch.no_grad():
        net.head.fc.weight[0, 0] = float("nan")
    save_net(net, tmp_path / "net")
    assert_one_line_error(invoke("eval", "--model", tmp_path / "net", "--data", "cifar10[0:5]", "--data-root",
                                 data_root), 1, "NaN or infinite values", "head.fc.weight")


def test_a_one_class_target_is_refused_before_stitching(tmp_path):
    out = tmp_path / "net"
    assert_one_line_error(invoke("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits[3]", "--probe-size",
                                 "20", "--out", out), 1, "digits[3:4] holds one class", "at least two", "digits[0:5]")
    assert not out.exists()


# --- saved networks (NET_DIR): broken weights, a structure.json that does not match ------------------------------------

@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    """Two small saved networks, net (resnet20_cifar5 nodes 1-3) and deeper (nodes 1-4)."""
    from reassembly.stitch import build_network
    from reassembly.stitch.build import pretrained_block
    from reassembly.stitch.io import save_net

    root = tmp_path_factory.mktemp("nets")
    save_net(build_network([pretrained_block("resnet20_cifar5", 1, 4)], num_classes=5), root / "net")
    save_net(build_network([pretrained_block("resnet20_cifar5", 1, 5)], num_classes=5), root / "deeper")
    return root


def _break_net(nets: Path, folder: Path, how: str) -> Path:
    import hashlib
    import shutil

    net = folder / "net"
    shutil.copytree(nets / "net", net)
    weights, structure = net / "model.safetensors", net / "structure.json"
    if how == "corrupt-weights":
        data = weights.read_bytes()
        weights.write_bytes(data[:100] + b"\x00" * 100 + data[200:])
    elif how == "zero-weights":
        weights.write_bytes(b"")
    elif how == "weights-a-directory":
        weights.unlink()
        weights.mkdir()
    elif how == "other-structure":
        structure.write_text((nets / "deeper" / "structure.json").read_text())
    elif how == "other-structure-same-hash":  # the sha256 check passes; the tensors still must fit
        record = json.loads((nets / "deeper" / "structure.json").read_text())
        record["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        structure.write_text(json.dumps(record))
    elif how == "truncated-structure":
        text = structure.read_text()
        structure.write_text(text[: len(text) // 2])
    elif how == "structure-without-blocks":
        record = json.loads(structure.read_text())
        del record["blocks"]
        structure.write_text(json.dumps(record))
    return net


BROKEN_NETS = [
    ("corrupt-weights", ["sha256 differs"]), ("zero-weights", ["sha256 differs"]),
    ("weights-a-directory", ["no weights file model.safetensors"]), ("other-structure", ["sha256 differs"]),
    ("other-structure-same-hash", ["does not fit", "shape mismatch", "missing", "blocks.0.layer2"]),
    ("truncated-structure", ["structure.json is not valid JSON"]),
    ("structure-without-blocks", ["structure.json is malformed", "blocks"]),
]


@pytest.mark.parametrize("how, needles", BROKEN_NETS, ids=[b[0] for b in BROKEN_NETS])
def test_broken_saved_networks(tmp_path, data_root, nets, how, needles):
    net = _break_net(nets, tmp_path, how)
    before = sorted(p.name for p in net.iterdir())
    out = tmp_path / "out"
    for args in (["eval", "--model", net, "--data", "cifar10[0:5]", "--json", out / "e.json"],
                 ["train", net, "--data", "cifar10[0:5]", "--out", out / "train"],
                 ["info", net], ["dissect", net, "--json", out / "d.json"]):
        line = assert_one_line_error(invoke(*args, "--data-root", data_root) if args[0] in ("eval", "train")
                                     else invoke(*args), 1, *needles)
        assert "classes" not in line
    assert_one_line_error(invoke("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "cifar10[0:5]", "--out", net,
                                 "--data-root", data_root), 1, "already holds a network", "--overwrite")
    assert not out.exists() and sorted(p.name for p in net.iterdir()) == before


# --- `reassembly run` recipes: the message names the key and its line ---------------------------------------------------

RECIPE = """\
name: tiny
data:
  target: digits
  max_per_class: 5
zoo: resnet20_cifar5,resnet20_fashion
search:
  budget:
    params: 0.5M
  proxy: params
train:
  modes: [frozen]
  epochs: 1
"""


@pytest.mark.parametrize("old, new, needles", [
    ("  proxy: params", "  proxy: params\n  topk: 3", ["line 10", "search.topk: unknown key", "top_k"]),
    ("name: tiny", "name: tiny\ncolour: blue", ["line 2", "colour: unknown key"]),
    ("  epochs: 1", "  epochs: one", ["line 12", "train.epochs", "integer"]),
    ("  modes: [frozen]", "  modes:\n  - frozen\n  - sideways", ["line 13", "train.modes.1", "'frozen' or 'full'"]),
    ("    params: 0.5M", "    params: half", ["line 8", "search.budget.params", "0.5M"]),
    ("  target: digits\n", "", ["line 2", "data.target: Field required"]),
    ("  target: digits", "  target: cifr10", ["line 3", "data.target", "did you mean cifar10"]),
    ("zoo: resnet20_cifar5,resnet20_fashion", "zoo: resnet20_cifar5,resnet20_fashon",
     ["line 5", "zoo.models", "did you mean resnet20_fashion"]),
    ("train:\n  modes: [frozen]\n  epochs: 1\n", "train: 5\n", ["line 10", "train", "valid dictionary"]),
    ("search:\n  budget:\n    params: 0.5M\n  proxy: params\n", "", ["search: Field required"]),
], ids=["unknown-key", "unknown-section", "wrong-type", "bad-list-item", "bad-size", "missing-field",
        "misspelled-dataset", "misspelled-model", "section-not-a-mapping", "missing-section"])
def test_recipe_errors_name_the_key_and_the_line(tmp_path, old, new, needles):
    assert old in RECIPE
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace(old, new))
    out = tmp_path / "run"
    line = assert_one_line_error(invoke("run", path, "--out", out), 1, f"{path}", *needles)
    if "line" not in needles[0]:
        assert ", line " not in line  # a missing section is the whole file's
    assert not out.exists()


# --- output folders that cannot be written: under a file (refused up front), a full disk (nothing half-written) --------

def _writers(tmp_path: Path, nets: Path, out: Path) -> dict[str, list]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    return {
        "stitch": ["stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits[0:3]", "--probe-size", "20",
                   "--out", out],
        "train": ["train", nets / "net", "--data", "digits[0:5]", "--epochs", "1", "--max-per-class", "4",
                  "--batch-size", "8", "--out", out],
        "similarity": ["similarity", "--zoo", "resnet20_cifar5,resnet20_fashion", "--data", "digits",
                       "--probe-size", "16", "--batch-size", "8", "--no-heatmaps", "--out", out],
        "run": ["run", recipe, "--out", out],
        "partition": ["partition", SPLIT_CIFAR, "--out", out / "p.json"],
        "search": ["search", SPLIT_CIFAR, "--data", "digits", "--params", "0.5M", "--out", out / "s.json"],
        "nas search": ["nas", "search", "--data", "digits", "--epochs", "1", "--cells", "3", "--channels", "4",
                       "--subset", "32", "--batch-size", "8", "--out", out],
        "nas train": ["nas", "train", "DARTS_V2", "--data", "digits", "--epochs", "1", "--cells", "3", "--channels",
                      "4", "--subset", "32", "--batch-size", "8", "--out", out],
        "zoo train": ["zoo", "train", "resnet20_cifar5", "--epochs", "1", "--no-ship", "--out", out],
    }


@pytest.mark.parametrize("verb", ["stitch", "train", "similarity", "run", "partition", "search", "nas search",
                                  "nas train", "zoo train"])
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, nets, verb):
    (tmp_path / "FILE").write_text("not a folder")
    out = tmp_path / "FILE" / "out"
    result = invoke(*_writers(tmp_path, nets, out)[verb])
    assert_one_line_error(result, 2, "'--out'", "cannot be created", f"{tmp_path / 'FILE'} is a file, not a folder")
    assert result.stdout == "" and (tmp_path / "FILE").read_text() == "not a folder"


def _disk_full(monkeypatch):
    import errno

    import reassembly.io

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(reassembly.io.os, "replace", full)  # os.replace itself: every atomic write fails


@pytest.mark.parametrize("verb", ["stitch", "train", "similarity", "run", "nas search", "nas train"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, nets, monkeypatch, verb):
    out = tmp_path / "out"
    args = _writers(tmp_path, nets, out)[verb]
    _disk_full(monkeypatch)
    assert_one_line_error(invoke(*args), 1, "No space left on device", str(out))
    left = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert left in ([], [".lock"]), left  # empty folders and a lock at most: no partial or temporary files


def test_a_disk_that_fills_up_between_the_weights_and_the_structure_leaves_no_half_network(tmp_path, nets,
                                                                                           monkeypatch):
    import errno
    import os

    import reassembly.io

    replace = os.replace

    def full_at_the_structure(src, dst):
        if str(dst).endswith("structure.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return replace(src, dst)

    monkeypatch.setattr(reassembly.io.os, "replace", full_at_the_structure)
    out = tmp_path / "out"
    assert_one_line_error(invoke(*_writers(tmp_path, nets, out)["stitch"]), 1, "No space left on device",
                          str(out / "structure.json"))
    assert files_in(out) == []  # the weights written first are gone again: no network without its structure


def test_a_recipe_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "FILE").write_text("not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'FILE' / 'run'}\n" + RECIPE)
    assert_one_line_error(invoke("run", recipe), 1, "cannot be created", f"{tmp_path / 'FILE'} is a file, not a folder",
                          "--out")
    assert (tmp_path / "FILE").read_text() == "not a folder"


# --- Model LEGO (`reassembly disassemble | assemble`): bad classes, models it cannot cut, clashing components ----------

LEGO_TRAIN, LEGO_TEST = 8, 3  # images per class of the tiny template dataset


def _template_images(per_class: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """JPEGs of 10 classes, each a fixed colour layout (left/right halves) plus noise, and their decoded pixels."""
    from PIL import Image

    palette = np.random.default_rng(123).integers(0, 256, (10, 2, 3))
    rng = np.random.default_rng(seed)
    jpegs, pixels = [], []
    for c in range(10):
        for _ in range(per_class):
            image = np.zeros((32, 32, 3))
            image[:, :16], image[:, 16:] = palette[c, 0], palette[c, 1]
            image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG")
            jpegs.append(buffer.getvalue())
            pixels.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return jpegs, np.stack(pixels)


def _tiny_cnn(num_classes: int = 10, pad_shortcut: bool = False):
    import torch.nn.functional as F
    from torch import nn

    class MyPad(nn.Module):  # an option-A shortcut the zoo does not know: channel zero-padding by hand
        def forward(self, x):
            return F.pad(x, (0, 0, 0, 0, 4, 4))

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
            self.shortcut = MyPad() if pad_shortcut else None
            self.conv = nn.Conv2d(24 if pad_shortcut else 16, 16, 3, 1, 1)
            self.head = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.features(x)
            if self.shortcut is not None:
                x = self.shortcut(x)
            return self.head(F.relu(self.conv(x)).mean((2, 3)))

    return TinyCNN()


@pytest.fixture(scope="module")
def lego(tmp_path_factory):
    """A data root with a tiny template CIFAR-10 (train and test), two registered test architectures and trained
    weights for the plain one (every train and test image right); unregistered again afterwards."""
    from reassembly import save_checkpoint
    from reassembly.data import normalize
    from reassembly.data.sources import CIFAR10_CLASSES
    from reassembly.zoo.registry import _REGISTRY, register_model

    root = tmp_path_factory.mktemp("lego")
    train_jpegs, train_pixels = _template_images(LEGO_TRAIN, 0)
    test_jpegs, test_pixels = _template_images(LEGO_TEST, 1)
    with zipfile.ZipFile(root / "cifar10-jpg.zip", "w") as archive:
        for split, jpegs, per in (("train", train_jpegs, LEGO_TRAIN), ("test", test_jpegs, LEGO_TEST)):
            for k, data in enumerate(jpegs):
                archive.writestr(f"{split}/{CIFAR10_CLASSES[k // per]}/{k:04d}.jpg", data)

    def lego_tiny_cnn(num_classes: int = 10):
        """A 3-conv test CNN."""
        return _tiny_cnn(num_classes)

    def lego_tiny_padded(num_classes: int = 10):
        """A test CNN with a hand-written channel-padding shortcut."""
        return _tiny_cnn(num_classes, pad_shortcut=True)

    for fn in (lego_tiny_cnn, lego_tiny_padded):
        register_model(family="test")(fn)
    try:
        from reassembly import create_model

        torch.manual_seed(0)
        model = create_model("lego_tiny_cnn")
        mean, std = model.input_normalization["mean"], model.input_normalization["std"]
        x = normalize(torch.from_numpy(train_pixels).permute(0, 3, 1, 2), mean, std)
        y = torch.arange(10).repeat_interleave(LEGO_TRAIN)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model.train()(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            xt = normalize(torch.from_numpy(test_pixels).permute(0, 3, 1, 2), mean, std)
            assert (model(x).argmax(1) == y).all()
            assert (model(xt).argmax(1) == torch.arange(10).repeat_interleave(LEGO_TEST)).all()
        save_checkpoint(model, root / "tiny.safetensors")
        save_checkpoint(create_model("lego_tiny_padded"), root / "padded.safetensors")
        yield root
    finally:
        for name in ("lego_tiny_cnn", "lego_tiny_padded"):
            _REGISTRY.pop(name, None)


def _written(folder: Path) -> list[str]:
    """What a command left in ``folder``, temporary folders included, the test's decode cache not."""
    return [name for name in files_in(folder) if name != "cache"]


def _disassemble(lego, out, classes, *extra):
    return invoke("disassemble", "lego_tiny_cnn", "--checkpoint", lego / "tiny.safetensors", "--classes", classes,
                  "--data", "cifar10", "--data-root", lego, "--per-class", "4", "--out", out, *extra)


@pytest.fixture(scope="module")
def lego_parts(lego, tmp_path_factory):
    """Components of the tiny CNN for classes 0,1,2 (calibrated thresholds), 3,4 and 2,5 (the paper's)."""
    root = tmp_path_factory.mktemp("parts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REASSEMBLY_CACHE", str(root / "cache"))  # not the user's cache
        for name, classes, extra in (("a", "0,1,2", ["--calibrate", "--held-out", "4"]), ("b", "3,4", []),
                                     ("c", "2,5", [])):
            result = _disassemble(lego, root / name, classes, *extra)
            assert result.exit_code == 0, result.output
    return root


def test_disassemble_then_assemble_then_eval(lego, lego_parts, tmp_path):
    a = lego_parts / "a"
    assert sorted(p.name for p in a.iterdir()) == ["component.json", "component.safetensors", "report.json",
                                                   "report.md", "routes.png"]
    report = json.loads((a / "report.json").read_text())
    assert report["classes"] == [0, 1, 2] and report["calibration"]["held_out_images"] == 12
    assert [r["images"] for r in report["accuracy"]["per_class"]] == [LEGO_TEST] * 3
    assert_ok(invoke("eval", "--model", a, "--data", "cifar10[0,1,2]", "--data-root", lego))
    for merge, scale in (("parallel", ["--scale"]), ("block-diagonal", [])):
        out = tmp_path / merge
        result = assert_ok(invoke("assemble", a, lego_parts / "b", "--merge", merge, *scale, "--data-root", lego,
                                  "--out", out))
        assert "cifar10[0,1,2,3,4]" in result.stdout
        assert files_in(out) == ["assembly.json", "assembly.safetensors", "report.json"]
        result = assert_ok(invoke("eval", "--model", out, "--data", "cifar10[0:5]", "--data-root", lego,
                                  "--json", tmp_path / f"{merge}.json"))
        assert json.loads((tmp_path / f"{merge}.json").read_text())["images"] == 5 * LEGO_TEST
    wrong = invoke("eval", "--model", tmp_path / "parallel", "--data", "cifar10[0:6]", "--data-root", lego)
    assert_one_line_error(wrong, 2, "an assembly for classes [0, 1, 2, 3, 4]", "cifar10[0,1,2,3,4]")


def test_disassemble_matching_the_loss_reaches_its_target_and_says_so(lego, tmp_path, monkeypatch):
    monkeypatch.setenv("REASSEMBLY_CACHE", str(tmp_path / "cache"))
    result = assert_ok(_disassemble(lego, tmp_path / "comp", "0,1,2", "--calibrate", "--held-out", "4",
                                    "--match-loss"))
    cal = json.loads((tmp_path / "comp" / "report.json").read_text())["calibration"]
    chosen = cal["tried"][cal["chosen"]]
    assert cal["match_loss"] and cal["met"] and chosen["loss"] <= cal["original_loss"]
    assert f"held-out cross-entropy: {chosen['loss']:.4f} against the original's {cal['original_loss']:.4f}" in \
        result.stdout
    assert "Cross-entropy over the classes, also required" in (tmp_path / "comp" / "report.md").read_text()


@pytest.mark.parametrize("classes, code, needles", [
    ("0,10", 1, ["class 10 does not exist", "lego_tiny_cnn has 10 classes (0..9)"]),
    ("", 2, ["'--classes'", "the class list is empty"]),
    (" , ", 2, ["the class list is empty"]),
    ("0,a", 2, ["not a comma-separated list of class indices"]),
    ("1,1", 2, ["distinct, non-negative"]),
    ("-1,2", 2, ["distinct, non-negative"]),
], ids=["out-of-range", "empty", "blank", "not-a-number", "repeated", "negative"])
def test_disassemble_classes_that_do_not_exist(lego, tmp_path, classes, code, needles):
    assert_one_line_error(_disassemble(lego, tmp_path / "comp", classes), code, *needles)
    assert _written(tmp_path) == []


@pytest.mark.parametrize("model, needles", [
    ("lego_tiny_padded", ["cannot extract through the channel padding in shortcut", "Torch-Pruning does not see it"]),
    ("vit_cifar5", ["channel graph cannot follow", "vit.py", "flatten"]),
], ids=["channel-padding", "vision-transformer"])
def test_disassemble_a_model_it_cannot_cut_names_the_layer(lego, tmp_path, model, needles):
    weights = ["--checkpoint", lego / "padded.safetensors"] if model == "lego_tiny_padded" else []
    result = invoke("disassemble", model, *weights, "--classes", "0,1", "--data", "cifar10", "--data-root", lego,
                    "--out", tmp_path / "comp")
    assert_one_line_error(result, 1, *needles)
    assert _written(tmp_path) == []


def test_disassemble_needs_trained_weights(lego, tmp_path):
    result = invoke("disassemble", "cifar_resnet20", "--classes", "0,1", "--data", "cifar10", "--out", tmp_path / "c")
    assert_one_line_error(result, 2, "no trained weights to disassemble", "--checkpoint")


def _bad_size(lego_parts, tmp_path):
    import shutil

    bad = tmp_path / "small"
    shutil.copytree(lego_parts / "b", bad)
    meta = json.loads((bad / "component.json").read_text())
    meta["record"]["input_size"] = [3, 16, 16]  # the tiny CNN pools globally, so it still rebuilds
    (bad / "component.json").write_text(json.dumps(meta))
    return bad


@pytest.mark.parametrize("case, code, needles", [
    ("clash", 1, ["class 2 of cifar10 is in component 1 and component 2", "one component only"]),
    ("size", 1, ["different input sizes", "component 1: 3x32x32", "component 2: 3x16x16"]),
    ("one", 2, ["at least two component folders"]),
    ("not-a-component", 1, ["holds no component", "reassembly disassemble"]),
    ("data-without-scale", 2, ["--data only says which data scales the heads"]),
], ids=["clashing-classes", "input-sizes", "one-component", "not-a-component", "data-without-scale"])
def test_bad_assemblies(lego, lego_parts, tmp_path, case, code, needles):
    args = {"clash": [lego_parts / "a", lego_parts / "c"],
            "size": [lego_parts / "a", _bad_size(lego_parts, tmp_path) if case == "size" else None],
            "one": [lego_parts / "a"], "not-a-component": [lego_parts / "a", tmp_path],
            "data-without-scale": [lego_parts / "a", lego_parts / "b", "--data", "cifar10"]}[case]
    out = tmp_path / "out"
    assert_one_line_error(invoke("assemble", *args, "--out", out, "--data-root", lego), code, *needles)
    assert not out.exists()


def test_disassemble_and_assemble_leave_nothing_half_written(lego, lego_parts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(_disassemble(lego, out, "0,1"), 1, "already exists and is not empty", "--overwrite")
    assert files_in(out) == ["keep.txt"]
    _disk_full(monkeypatch)
    for result in (_disassemble(lego, tmp_path / "comp", "0,1"),
                   invoke("assemble", lego_parts / "a", lego_parts / "b", "--out", tmp_path / "asm")):
        assert_one_line_error(result, 1, "No space left on device")
    assert _written(tmp_path) == ["out"] and files_in(out) == ["keep.txt"]
