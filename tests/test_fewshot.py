"""Few-shot logistic regression, MSN protocol (tasks/fewshot.py): split files, generated splits, the penalty mapping,
the per-row preprocessing, and the task end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.optimize import minimize
from scipy.special import logsumexp

from ssl_bench.cli import cli
from ssl_bench.data import image_folder, resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.io import sha256_file
from ssl_bench.logreg import fit_logistic
from ssl_bench.results import read_rows
from ssl_bench.tasks.fewshot import (
    FEWSHOT_VERSION, FewShotParams, SubsetSplit, build_settings, fewshot_top1, generate_fraction, generate_split,
    msn_split_file, parse_split_file, penalty_to_C, preprocess,
)

from replicas import make_imagefolder

TINY = "vit_nano_patch4_32"
WNIDS = ("n00000000", "n00000001", "n00000007")  # make_imagefolder's class folders for digits 0, 1, 7


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("fewshot") / "imnet")


def train_names(root: Path) -> dict[str, list[str]]:
    return {wnid: sorted(p.name for p in (root / "train" / wnid).iterdir()) for wnid in WNIDS}


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("".join(line + newline for line in lines)).encode())
    return path


def msn_dir(root: Path, folder: Path, per_class: dict[str, int] | None = None) -> Path:
    """MSN's layout for the replica: imagenet_subsets{1,2,3}/{1,2,5}imgs_class.txt (split 3's 5-shot file under
    MSN's name 3imgs_class.txt), nested within a split, and imagenet_subsets1/1percent.txt (3 per class)."""
    names = train_names(root)
    for split in (1, 2, 3):
        for shots in (1, 2, 5):
            file = f"{3 if (split, shots) == (3, 5) else shots}imgs_class.txt"
            lines = [names[w][(split - 1) * 3 + i] for w in WNIDS for i in range(shots)]  # offsets: splits differ
            write_lines(folder / f"imagenet_subsets{split}" / file, lines)
    write_lines(folder / "imagenet_subsets1" / "1percent.txt", [names[w][i] for w in WNIDS for i in range(3)])
    return folder


# --- split files ----------------------------------------------------------------------------------------------

def test_msn_file_names(tmp_path):
    assert msn_split_file(tmp_path, 2, 1) == tmp_path / "imagenet_subsets1" / "2imgs_class.txt"
    # Split 3 of the 5-shot setting is MSN's mis-named 3imgs_class.txt (5 images per class) when there is no 5imgs file.
    write_lines(tmp_path / "imagenet_subsets3" / "3imgs_class.txt", ["n00000000_1.JPEG"])
    assert msn_split_file(tmp_path, 5, 3) == tmp_path / "imagenet_subsets3" / "3imgs_class.txt"
    write_lines(tmp_path / "imagenet_subsets3" / "5imgs_class.txt", ["n00000000_1.JPEG"])
    assert msn_split_file(tmp_path, 5, 3) == tmp_path / "imagenet_subsets3" / "5imgs_class.txt"
    assert msn_split_file(tmp_path, 5, 2) == tmp_path / "imagenet_subsets2" / "5imgs_class.txt"


def test_split_file_lines_map_to_train_images(replica, tmp_path):
    train = image_folder(replica).split("train")
    names = train_names(replica)
    chosen = [names["n00000007"][4], names["n00000000"][0], names["n00000001"][2]]
    # CRLF endings, blank lines and surrounding blanks are tolerated.
    path = write_lines(tmp_path / "split.txt", [chosen[0], "", f"  {chosen[1]} ", chosen[2], ""], newline="\r\n")
    indices = parse_split_file(path, train)
    assert [Path(train.paths[i]).name for i in indices] == chosen
    assert [train.classes[label] for label in train.labels[indices]] == ["n00000007", "n00000000", "n00000001"]
    assert all(Path(train.paths[i]).parent.name == name.split("_")[0] for i, name in zip(indices, chosen))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("garbage.JPEG", r"line 2: 'garbage.JPEG' is not <wnid>_<id>.JPEG"),
        ("n09999999_3.JPEG", r"line 2: 'n09999999_3.JPEG' names class 'n09999999', which is not a class folder"),
        ("n00000001_99999.JPEG", r"line 2: no image .*train/n00000001/n00000001_99999.JPEG in the train split"),
    ],
)
def test_bad_split_lines_name_the_file_and_line(replica, tmp_path, bad, message):
    train = image_folder(replica).split("train")
    path = write_lines(tmp_path / "bad.txt", [train_names(replica)["n00000000"][0], bad])
    with pytest.raises(UserError, match=message) as error:
        parse_split_file(path, train)
    assert str(path) in str(error.value)


def test_missing_or_unusable_split_files(replica, tmp_path):
    train = image_folder(replica).split("train")
    with pytest.raises(UserError, match="does not exist"):
        parse_split_file(tmp_path / "nope.txt", train)
    with pytest.raises(UserError, match="is empty"):
        parse_split_file(write_lines(tmp_path / "empty.txt", ["", "  "]), train)
    with pytest.raises(UserError, match="split files need an ImageFolder"):
        digits = resolve_dataset("builtin:digits").split("train")
        parse_split_file(write_lines(tmp_path / "x.txt", ["n00000000_1.JPEG"]), digits)


def test_msn_folder_settings(replica, tmp_path):
    train = image_folder(replica).split("train")
    folder = msn_dir(replica, tmp_path / "msn")
    source, settings = build_settings(FewShotParams(split_dir=str(folder)), train)
    assert source == "msn-files"
    assert [s.name for s in settings] == ["1shot", "2shot", "5shot", "1pct"]
    assert [s.metric for s in settings] == ["top1_1shot", "top1_2shot", "top1_5shot", "top1_1pct"]
    for setting in settings[:3]:
        assert len(setting.splits) == 3
        for split in setting.splits:
            assert np.bincount(train.labels[split.indices], minlength=3).tolist() == [setting.shots] * 3
            assert split.source["sha256"] == sha256_file(split.source["file"])
    assert settings[2].splits[2].source["file"].endswith("imagenet_subsets3/3imgs_class.txt")
    assert len(settings[3].splits) == 1 and len(settings[3].splits[0].indices) == 9
    # A file with the wrong count per class, or a class missing, is refused.
    names = train_names(replica)
    write_lines(folder / "imagenet_subsets2" / "2imgs_class.txt", [names[w][0] for w in WNIDS])
    with pytest.raises(UserError, match="should hold 2 images per class; it holds 1 to 1"):
        build_settings(FewShotParams(split_dir=str(folder)), train)
    write_lines(folder / "imagenet_subsets2" / "2imgs_class.txt", [names[w][i] for w in WNIDS[:2] for i in (0, 1)])
    with pytest.raises(UserError, match=r"has no image of 1 of the 3 classes \(n00000007\)"):
        build_settings(FewShotParams(split_dir=str(folder)), train)
    with pytest.raises(UserError, match="not both"):
        build_settings(FewShotParams(split_dir=str(folder), split_file=("a.txt",)), train)


def test_split_file_option_groups_files_by_shots(replica, tmp_path):
    train = image_folder(replica).split("train")
    names = train_names(replica)
    a = write_lines(tmp_path / "a.txt", [names[w][0] for w in WNIDS])
    b = write_lines(tmp_path / "b.txt", [names[w][1] for w in WNIDS])
    c = write_lines(tmp_path / "1percent.txt", [names[w][i] for w in WNIDS for i in range(4)])
    source, settings = build_settings(FewShotParams(split_file=(str(a), str(b), str(c))), train)
    assert source == "files"
    assert [(s.name, s.shots, len(s.splits)) for s in settings] == [("1shot", 1, 2), ("1pct", 4, 1)]


# --- generated splits -------------------------------------------------------------------------------------------

def test_generated_splits_k_per_class_every_class_by_seed():
    labels = np.repeat(np.arange(4), [6, 9, 5, 7])
    for shots in (1, 2, 5):
        split = generate_split(labels, 4, shots, seed=3)
        assert np.bincount(labels[split], minlength=4).tolist() == [shots] * 4
        assert len(set(split.tolist())) == len(split)
        assert np.array_equal(split, generate_split(labels, 4, shots, seed=3))  # deterministic
    assert not np.array_equal(generate_split(labels, 4, 2, seed=0), generate_split(labels, 4, 2, seed=1))
    one, two, five = (set(generate_split(labels, 4, k, seed=7).tolist()) for k in (1, 2, 5))
    assert one < two < five  # nested within a seed, as MSN's splits are
    with pytest.raises(UserError, match=r"too few training images in 1 classes .*c2 \(5 of 6\)"):
        generate_split(labels, 4, 6, seed=0, classes=["c0", "c1", "c2", "c3"])


def test_generated_one_percent_is_balanced_like_simclr():
    # ImageNet-like class sizes 732..1300: 1 % of 10 classes' 11,500 images is 115, 11 or 12 per class whatever the size
    sizes = [732, 1300, 1300, 1000, 1300, 900, 1300, 1268, 1100, 1300]
    labels = np.repeat(np.arange(10), sizes)
    subset = generate_fraction(labels, 10, 0.01, seed=0)
    counts = np.bincount(labels[subset], minlength=10)
    assert counts.sum() == round(0.01 * len(labels)) == 115 and set(counts.tolist()) == {11, 12}
    assert np.array_equal(subset, generate_fraction(labels, 10, 0.01, seed=0))
    assert set(generate_split(labels, 10, 5, seed=0).tolist()) <= set(subset.tolist())  # 5-shot split inside
    tiny = generate_fraction(np.repeat(np.arange(3), 20), 3, 0.01, seed=0)  # 0.6 images: one per class at least
    assert np.bincount(np.repeat(np.arange(3), 20)[tiny]).tolist() == [1, 1, 1]


def test_generated_settings_record_seeds():
    train = resolve_dataset("builtin:digits").split("train")
    source, settings = build_settings(FewShotParams(shots=(1, 2), splits=2, seed=10), train)
    assert source == "generated"
    assert [(s.name, [sp.source for sp in s.splits]) for s in settings] == [
        ("1shot", [{"seed": 10}, {"seed": 11}]), ("2shot", [{"seed": 10}, {"seed": 11}]),
        ("1pct", [{"seed": 10, "fraction": 0.01}])]


def test_subset_split_loads_and_keys_only_its_images(replica):
    train = image_folder(replica).split("train")
    subset = SubsetSplit(train, np.array([3, 20, 31]))
    assert len(subset) == 3 and subset.labels.tolist() == train.labels[[3, 20, 31]].tolist()
    assert subset.load_image(1).size == train.load_image(20).size
    assert subset.manifest_lines() == [train.manifest_lines()[i] for i in (3, 20, 31)]
    assert subset.manifest_sha256() != SubsetSplit(train, np.array([3, 20, 32])).manifest_sha256()


# --- preprocessing and the classifier ---------------------------------------------------------------------------

def test_preprocess_centres_then_normalises_each_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 6.0]])
    # row 0: mean 2 -> (-1, 0, 1), norm sqrt(2); row 1: mean 10/3 -> (-4/3, -4/3, 8/3), norm sqrt(96)/3
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]], dtype=torch.float64)
    expected = expected / expected.norm(dim=1, keepdim=True)
    out = preprocess(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(preprocess(x[1:]), out[1:])  # per row: no statistics shared between rows
    torch.testing.assert_close(preprocess(5 * x + 3), out)  # invariant to the scale and offset of a row


def msn_objective(w: np.ndarray, X: np.ndarray, y: np.ndarray, k: int, lambd: float) -> tuple[float, np.ndarray]:
    """MSN's (cyanure's) objective with lambda = lambd / n: (1/n) sum CE(W x_i, y_i) + (lambd / (2n)) ||W||^2."""
    n = len(y)
    W = w.reshape(k, X.shape[1])
    Z = X @ W.T
    lse = logsumexp(Z, axis=1)
    value = (lse - Z[np.arange(n), y]).mean() + lambd / (2 * n) * (W ** 2).sum()
    G = np.exp(Z - lse[:, None])
    G[np.arange(n), y] -= 1
    return value, (G.T @ X / n + lambd / n * W).ravel()


def test_penalty_mapping_matches_a_direct_minimisation_of_msns_objective():
    rng = np.random.default_rng(0)
    k, d, n, lambd = 4, 6, 40, 0.075
    y = np.arange(n) % k
    X = preprocess(torch.from_numpy(rng.standard_normal((n, d)) + 1.5 * rng.standard_normal((k, d))[y])).numpy()
    direct = minimize(msn_objective, np.zeros(k * d), args=(X, y, k, lambd), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000}).x.reshape(k, d)
    assert penalty_to_C(lambd) == pytest.approx(1 / 0.075)
    ours = fit_logistic(torch.from_numpy(X), torch.from_numpy(y), k, C=penalty_to_C(lambd), fit_intercept=False,
                        tol=1e-11)
    np.testing.assert_allclose(ours.coef.numpy(), direct, atol=1e-6 * np.abs(direct).max(), rtol=0)
    # The mapping matters: reading lambd as cyanure's lambda itself (C = n / lambd) is a different, weaker penalty.
    wrong = fit_logistic(torch.from_numpy(X), torch.from_numpy(y), k, C=n / lambd, fit_intercept=False, tol=1e-11)
    assert np.abs(wrong.coef.numpy() - direct).max() > 0.1 * np.abs(direct).max()
    with pytest.raises(UserError, match="lambd must be > 0"):
        penalty_to_C(0.0)


def test_fewshot_top1_on_separable_features():
    # Three classes along the axes; val images near their class axis: every one classified right.
    train = preprocess(torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]]))
    val = preprocess(torch.tensor([[4.0, 1, 0, 0], [0, 3.0, 1, 0], [1, 0, 2.0, 0], [0, 0, 3.0, 1]]))
    top1, report = fewshot_top1(train, torch.tensor([0, 1, 2]), val, torch.tensor([0, 1, 2, 2]), 3)
    assert top1 == 100.0 and report["converged"]


# --- the task through the CLI -------------------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


def test_cli_builtin_digits_generated_splits(tmp_path):
    results, cache = tmp_path / "runs.csv", tmp_path / "cache"
    out = invoke("run", "--task", "fewshot", "--model", TINY, "--data", "builtin:digits", "--workers", "0",
                 "--cache-dir", str(cache), "--results", str(results), "-p", "shots=1,2", "-p", "splits=2",
                 "-p", "seed=5")
    assert out.exit_code == 0, out.output
    rows = {r.metric: r for r in read_rows(results)}
    assert list(rows) == ["top1_1shot", "top1_2shot", "top1_1pct"]
    for metric, shots in (("top1_1shot", 1), ("top1_2shot", 2)):
        row = rows[metric]
        assert row.task == "fewshot" and row.protocol == FEWSHOT_VERSION and row.split == "val" and row.n == 450
        assert row.params["splits"] == [{"seed": 5}, {"seed": 6}] and row.params["shots"] == shots
        assert row.params["n_train"] == [10 * shots] * 2 and row.params["split_source"] == "generated"
        assert row.value == pytest.approx(np.mean(row.params["per_split_top1"]))
        assert row.std == pytest.approx(np.std(row.params["per_split_top1"]))
        assert 0 <= row.value <= 100 and row.params["converged"]
    one_pct = rows["top1_1pct"]
    assert one_pct.std is None and one_pct.params["splits"] == [{"seed": 5, "fraction": 0.01}]
    assert all(r.params["lambd"] == 0.075 and r.params["C"] == pytest.approx(1 / 0.075) for r in rows.values())
    assert all(r.params["feature"] == "cls_prenorm" and r.params["transform"] == "eval_msn" for r in rows.values())
    assert all(r.params["precision"] == "fp32" and "no-intercept" in r.params["solver"] for r in rows.values())
    # Only the splits' images went through the backbone: the cached train entry holds their union, no more.
    digits = resolve_dataset("builtin:digits").split("train")
    _, settings = build_settings(FewShotParams(shots=(1, 2), splits=2, seed=5), digits)
    union = np.unique(np.concatenate([s.indices for setting in settings for s in setting.splits]))
    shapes = sorted(json.loads(p.read_text())["shape"][0] for p in cache.glob("*/*/meta.json"))
    assert shapes == sorted([len(union), 450])


def test_cli_msn_split_folder_on_imagefolder_replica(replica, tmp_path):
    folder = msn_dir(replica, tmp_path / "msn")
    results = tmp_path / "runs.csv"
    args = ["run", "--task", "fewshot", "--model", TINY, "--data", str(replica), "--data-name", "imagenet",
            "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--results", str(results),
            "-p", f"split_dir={folder}", "-p", "feature=cls"]
    out = invoke(*args)
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert [r.metric for r in rows] == ["top1_1shot", "top1_2shot", "top1_5shot", "top1_1pct"]
    assert all(r.dataset == "imagenet" and r.n == 15 and r.params["feature"] == "cls" for r in rows)
    files = [s["file"] for s in rows[2].params["splits"]]
    assert [Path(f).parent.name + "/" + Path(f).name for f in files] == [
        "imagenet_subsets1/5imgs_class.txt", "imagenet_subsets2/5imgs_class.txt", "imagenet_subsets3/3imgs_class.txt"]
    assert rows[3].params["n_train"] == [9] and rows[3].params["split_source"] == "msn-files"
    # Same splits again: features come from the cache and the numbers do not move.
    out = invoke(*args)
    assert out.exit_code == 0, out.output
    again = read_rows(results)[4:]
    assert [(r.metric, r.value) for r in again] == [(r.metric, r.value) for r in rows]


def test_cli_bad_split_line_is_a_one_line_error(replica, tmp_path):
    bad = write_lines(tmp_path / "bad.txt", ["n00000000_1.JPEG", "n00000001_424242.JPEG"])
    out = CliRunner().invoke(cli, ["run", "--task", "fewshot", "--model", TINY, "--data", str(replica),
                                   "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                                   "--results", str(tmp_path / "r.csv"), "-p", f"split_file={bad}"])
    assert out.exit_code != 0 and "Traceback" not in out.output
    assert f"{bad}, line 1" in out.output or f"{bad}, line 2" in out.output
    assert not (tmp_path / "r.csv").exists()


def test_cli_split_file_flag(replica, tmp_path):
    names = train_names(replica)
    files = [write_lines(tmp_path / f"{s}.txt", [names[w][s] for w in WNIDS]) for s in (0, 1)]
    results = tmp_path / "runs.csv"
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "fewshot", "--model", "vit_nano_patch4_32", "--data",
                                   str(replica), "--split-file", str(files[0]), "--split-file", str(files[1]),
                                   "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--results",
                                   str(results)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert [r.metric for r in rows] == ["top1_1shot"] and rows[0].std is not None
    assert len(rows[0].params["splits"]) == 2 and len(rows[0].params["per_split_top1"]) == 2
