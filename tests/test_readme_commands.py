"""Every `ssl-bench ...` command in README.md's code blocks is one the real CLI accepts.

Each command is parsed by the click command it names (no work is run): the subcommand exists, its options
parse, the tasks after --task are registered, every ``-p key=value`` is an option of one of those tasks with a
value of the right type, and pretraining overrides are settings of the preset. Paths are placeholders and are
not checked. The cheap, self-contained commands (`ssl-bench list`, `ssl-bench leaderboard` and `ssl-bench
report` on a folder without results) are run as well.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ssl_bench.cli import _parse_task_options, cli
from ssl_bench.errors import UserError
from ssl_bench.registry import get_task, parse_params

README = Path(__file__).resolve().parent.parent / "README.md"
SEPARATORS = {"&&", "||", ";", "|"}
ELIDED = "..."  # "--task knn ..." in the README: the remaining arguments are left out


def code_blocks(markdown: str) -> list[str]:
    """The text of every fenced code block."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)


def readme_commands(markdown: str) -> list[list[str]]:
    """The arguments (after the program name) of every ssl-bench command in the code blocks: `ssl-bench ARGS` and
    `torchrun ... -m ssl_bench.cli ARGS`, with `\\` continuations joined, comments dropped and `&&` chains split."""
    commands: list[list[str]] = []
    for block in code_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token not in SEPARATORS:
                    segment.append(token)
                    continue
                if segment[:1] == ["ssl-bench"]:
                    commands.append(segment[1:])
                elif "ssl_bench.cli" in segment and segment[segment.index("ssl_bench.cli") - 1] == "-m":
                    commands.append(segment[segment.index("ssl_bench.cli") + 1:])
                segment = []
    return commands


def check_command(args: list[str]) -> click.Context:
    """Parse ``args`` as the CLI would, and check task names, task options and pretraining overrides; raise
    click.UsageError or UserError on anything the CLI would refuse before running."""
    args = [a for a in args if a != ELIDED]
    group_flags = {opt for param in cli.params for opt in (*param.opts, *param.secondary_opts)}
    while args and args[0] in group_flags:  # -q / -v take no value
        args = args[1:]
    parent = click.Context(cli, info_name="ssl-bench")
    if not args:
        raise click.UsageError("no subcommand", parent)
    command = cli.get_command(parent, args[0])
    if command is None:
        raise click.UsageError(f"no subcommand {args[0]!r}; valid: {', '.join(cli.list_commands(parent))}", parent)
    ctx = command.make_context(args[0], args[1:], parent=parent, resilient_parsing=False)
    if args[0] == "run":
        names = [t.strip() for t in ctx.params["tasks"].split(",") if t.strip()]
        options = (*ctx.params["options"], *(["fewshot.split_file=x"] if ctx.params["split_files"] else []))
        per_task = _parse_task_options(tuple(options), names)  # unknown tasks and option names raise UserError
        for name in names:
            parse_params(get_task(name), per_task[name])  # values of the option's type
    if args[0] == "pretrain" and ctx.params["preset"]:
        from ssl_bench.pretrain.config import make_config

        overrides = dict(item.partition("=")[::2] for item in ctx.params["overrides"])
        make_config(ctx.params["preset"], overrides)
    return ctx


# --------------------------------------------------------------------------- the extraction and the checker


def test_commands_are_extracted_from_code_blocks_only():
    markdown = (
        "Run `ssl-bench nothing` in prose.\n\n```bash\n"
        "python3 -m pip install -e . && ssl-bench demo\n"
        "ssl-bench run --task knn --model vit_small_patch16_224 \\\n"
        "    --data /data/imagenet   # a comment with ssl-bench in it\n"
        "torchrun --nproc_per_node 8 -m ssl_bench.cli run --task knn ...\n"
        "bash benchmarks/longtail_study.sh\n```\n"
    )
    assert readme_commands(markdown) == [
        ["demo"],
        ["run", "--task", "knn", "--model", "vit_small_patch16_224", "--data", "/data/imagenet"],
        ["run", "--task", "knn", "..."],
    ]


@pytest.mark.parametrize("line, error", [
    ("ssl-bench run --task knn -p k=10,20 --data builtin:digits", "no task among knn has an option 'k'"),
    ("ssl-bench run --task knn -p ks=ten --data builtin:digits", "expected int"),
    ("ssl-bench run --task knnn --data builtin:digits", "unknown task 'knnn'"),
    ("ssl-bench run --task knn --modell resnet50", "No such option"),
    ("ssl-bench scores --task knn", "no subcommand 'scores'"),
    ("ssl-bench pretrain --preset tiny_cpu --data builtin:digits --out runs/x epoch=3", "epoch"),
])
def test_checker_refuses_what_the_cli_refuses(line, error):
    (args,) = readme_commands(f"```\n{line}\n```\n")
    with pytest.raises((click.UsageError, UserError), match=error):
        check_command(args)


# --------------------------------------------------------------------------- this README


def _readme_commands() -> list[list[str]]:
    return readme_commands(README.read_text())


def test_the_readme_has_commands():
    subcommands = {args[0] for args in _readme_commands()}
    assert {"demo", "list", "run", "leaderboard", "pretrain", "report"} <= subcommands


@pytest.mark.parametrize("args", _readme_commands(), ids=lambda args: " ".join(args)[:60])
def test_readme_command_is_accepted_by_the_cli(args):
    check_command(args)


def test_list_runs_and_names_every_task():
    assert ["list"] in _readme_commands()
    out = CliRunner().invoke(cli, ["-q", "list"], catch_exceptions=False)
    assert out.exit_code == 0
    for task in ("knn", "linear", "fewshot", "transfer", "retrieval", "davis", "finetune", "prototypes"):
        assert f"  {task} " in out.output
    assert "ks=(10, 20, 100, 200)" in out.output


@pytest.mark.parametrize("made", [False, True], ids=["no results folder", "empty results folder"])
def test_leaderboard_and_report_without_results_give_one_line(made, tmp_path, monkeypatch):
    commands = _readme_commands()
    assert ["leaderboard"] in commands
    (report,) = [args for args in commands if args[0] == "report"]
    monkeypatch.chdir(tmp_path)  # the default results folder is ./results
    if made:
        (tmp_path / "results").mkdir()
    for args in (["leaderboard"], report):
        out = CliRunner().invoke(cli, ["-q", *args])
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "results" in lines[0], out.output
