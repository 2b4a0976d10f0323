"""Task options are checked before any model is built or any data is read (issue 16, item 6)."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

import ssl_bench.backbones
import ssl_bench.data
from ssl_bench.cli import cli
from ssl_bench.errors import UserError
from ssl_bench.options import check_between, check_ints_at_least, check_positive
from ssl_bench.registry import Task, all_tasks, check_params
from ssl_bench.runner import run_tasks

TINY = "vit_nano_patch4_32"


@pytest.fixture
def no_work(monkeypatch):
    """Model creation and dataset resolution raise if reached: a bad option must fail before either."""
    calls: list[str] = []

    def forbidden(name: str):
        def fail(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} called before the options were checked")
        return fail

    monkeypatch.setattr(ssl_bench.backbones, "create_backbone", forbidden("create_backbone"))
    monkeypatch.setattr(ssl_bench.data, "resolve_dataset", forbidden("resolve_dataset"))
    return calls


@pytest.mark.parametrize(
    "task, option, message",
    [
        ("knn", "ks=-5", "knn.ks must be integers >= 1; got -5"),
        ("knn", "ks=10,0", "knn.ks must be integers >= 1; got 0"),
        ("knn", "temperature=0", "knn.temperature must be a finite number > 0; got 0.0"),
        ("knn", "temperature=nan", "knn.temperature must be a finite number > 0; got nan"),
        ("knn", "feature=patch", "knn.feature='patch': this task needs pooled features"),
        ("knn", "backend=gpu", "knn.backend='gpu'; expected one of auto, torch, faiss"),
        ("knn", "few_shot=200", "knn.few_shot (200) must not exceed knn.many_shot (100)"),
        ("fewshot", "lambd=-1", "fewshot.lambd must be a finite number > 0; got -1.0"),
        ("fewshot", "shots=0,5", "fewshot.shots must be integers >= 1; got 0"),
        ("fewshot", "split_file=NO_SUCH_SPLIT.txt", "split file NO_SUCH_SPLIT.txt does not exist"),
        ("linear", "lrs=0.1,-1", "linear.lrs must be a non-empty list of finite numbers > 0"),
        ("linear", "momentum=1", "linear.momentum must lie in [0, 1); got 1.0"),
        ("linear", "epochs=0", "linear.epochs must be a number >= 1; got 0"),
        ("prototypes", "k=0", "prototypes.k must be a number >= 1; got 0"),
        ("prototypes", "temperature=-0.1", "prototypes.temperature must be a finite number > 0"),
        ("transfer", "protocol=holdout", "transfer.protocol='holdout'; expected one of cv5, sslt-holdout"),
        ("transfer", "folds=1", "transfer.folds must be a number >= 2; got 1"),
        ("transfer", "datasets=mnist", "unknown transfer dataset(s) mnist"),
        ("retrieval", "kappas=0,5", "retrieval.kappas must be integers >= 1; got 0"),
        ("retrieval", "datasets=paris", "retrieval dataset 'paris'"),
        ("davis", "temperature=-1", "davis temperature must be > 0; got -1.0"),
        ("davis", "topk=0", "davis topk must be >= 1; got 0"),
        ("finetune", "drop_path=1.5", "finetune.drop_path must lie in [0, 1); got 1.5"),
        ("finetune", "lr=0.001,0", "finetune.lr must be a finite number > 0; got 0.0"),
        ("finetune", "recipe=huge", "finetune.recipe='huge'; expected one of auto, imagenet, small"),
    ],
)
def test_a_bad_option_fails_before_the_model_or_data(task, option, message, no_work, tmp_path):
    args = ["run", "--task", task, "--model", TINY, "-p", option, "--results", str(tmp_path / "runs.csv")]
    args += ["--data-root", str(tmp_path)] if "data_root" in all_tasks()[task].needs else ["--data", "builtin:digits"]
    out = CliRunner().invoke(cli, args)
    assert no_work == [], f"{no_work} ran before the bad option was reported"
    assert out.exit_code == 1 and message in out.output, out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_the_last_tasks_bad_option_fails_before_the_first_task(no_work, tmp_path):
    out = CliRunner().invoke(cli, ["run", "--task", "knn,fewshot", "--model", TINY, "--data", "builtin:digits",
                                   "-p", "fewshot.lambd=0", "--results", str(tmp_path / "runs.csv")])
    assert no_work == [] and out.exit_code == 1 and "fewshot.lambd must be a finite number > 0" in out.output


def test_every_task_checks_its_options_and_its_defaults_pass():
    for task in all_tasks().values():
        assert task.check is not None, f"task {task.name} registers no option check"
        check_params(task, task.params())


def test_the_runner_checks_every_task_before_running_any():
    ran: list[str] = []

    @dataclasses.dataclass
    class Params:
        k: int = 1

    def check(params: Params) -> None:
        if params.k < 1:
            raise UserError(f"fake.k must be >= 1; got {params.k}")

    first = Task("first", "v1", "", Params, lambda ctx, p: ran.append("first") or [], check=check)
    second = Task("second", "v1", "", Params, lambda ctx, p: ran.append("second") or [], check=check)
    with pytest.raises(UserError, match="fake.k must be >= 1; got 0"):
        run_tasks([(first, Params(1)), (second, Params(0))], ctx=None)
    assert ran == []


def test_check_helpers_name_the_option_and_the_expected_range():
    with pytest.raises(UserError, match=r"^x must be a finite number > 0; got inf$"):
        check_positive("x", float("inf"))
    check_positive("x", None)  # left to a default
    with pytest.raises(UserError, match=r"^ks is empty; expected one or more integers >= 1$"):
        check_ints_at_least("ks", (), 1)
    with pytest.raises(UserError, match=r"^p must lie in \(0, 1\]; got 0$"):
        check_between("p", 0, 0, 1, low_open=True)
    check_between("p", 1.0, 0, 1, low_open=True)
