"""Command line: a thin layer over the library functions that the tests call directly."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import click

from .errors import UserError

log = logging.getLogger("ssl_bench")
DEFAULT_RESULTS_DIR = "results"
DEFAULT_RESULTS_FILE = "runs.csv"


class _Group(click.Group):
    """User mistakes end as one 'Error: ...' line, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def cli(verbose: int, quiet: bool) -> None:
    """Pretrain and benchmark self-supervised vision backbones."""
    configure_logging(logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO))


def _own_or_warning(record: logging.LogRecord) -> bool:
    """ssl-bench's records at any level; other libraries' only from WARNING up."""
    return record.levelno >= logging.WARNING or record.name == "ssl_bench" or record.name.startswith("ssl_bench.")


def configure_logging(level: int, stream=None) -> None:
    """Log ssl-bench's messages from ``level`` up, and third-party libraries' only from WARNING up: their INFO
    and DEBUG chatter (faiss's loader lines name a ModuleNotFoundError on every kNN run) reads like errors."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True,
                        stream=stream)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_own_or_warning)


@cli.command("list")
def list_cmd() -> None:
    """Tasks (with protocol versions and options), backbone families, checkpoint formats and dataset specs."""
    from .backbones import FAMILIES, known_models
    from .checkpoint import CHECKPOINT_FORMATS
    from .data import dataset_kinds
    from .registry import all_tasks

    click.echo("tasks:")
    for task in all_tasks().values():
        options = ", ".join(f"{f.name}={_short(f.default)}" for f in dataclasses.fields(task.params))
        click.echo(f"  {task.name:<12} {task.version:<24} {task.description}")
        click.echo(f"  {'':<12} options: {options}")
    click.echo(f"backbones (any of timm's {len(known_models())} model names; created with pretrained=False):")
    for family, names in FAMILIES.items():
        click.echo(f"  {family:<12} {', '.join(names)}")
    click.echo("checkpoint formats (detected automatically):")
    for name, text in CHECKPOINT_FORMATS.items():
        click.echo(f"  {name:<12} {text}")
    click.echo("dataset specs:")
    for kind in dataset_kinds():
        click.echo(f"  {kind}")
    from ssl_bench.pretrain.config import preset_names

    click.echo(f"pretraining presets: {', '.join(preset_names())}")


def _short(value: object) -> str:
    """A default as `ssl-bench list` shows it: long sequences by their ends and length."""
    if value is dataclasses.MISSING:
        return "?"
    if isinstance(value, (tuple, list)) and len(value) > 6:
        return f"({value[0]}, {value[1]}, ..., {value[-1]}: {len(value)} values)"
    return str(value)


def _parse_task_options(values: tuple[str, ...], task_names: list[str]) -> dict[str, dict[str, str]]:
    """``-p key=value`` applies to every task with that option; ``-p task.key=value`` to one task."""
    from .registry import get_task

    per_task: dict[str, dict[str, str]] = {name: {} for name in task_names}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"option {item!r}; expected key=value or task.key=value")
        scope, dot, name = key.rpartition(".")
        targets = [scope] if dot else task_names
        if dot and scope not in per_task:
            raise UserError(f"option {item!r} names task {scope!r}, which is not among --task {','.join(task_names)}")
        matched = [t for t in targets if name in {f.name for f in dataclasses.fields(get_task(t).params)}]
        if not matched:
            raise UserError(f"no task among {', '.join(targets)} has an option {name!r} (see `ssl-bench list`)")
        for target in matched:
            per_task[target][name] = value
    return per_task


def _resolve_data(tasks: list, data: str | None, data_name: str | None, data_root: str | None):
    """``--data`` for tasks on one labelled dataset; ``--data-root`` for tasks that find their own data under a
    folder (retrieval, davis, transfer): those declare ``data_root`` in their needs."""
    from .data import Dataset, resolve_dataset

    rooted = [t.name for t in tasks if "data_root" in t.needs]
    if rooted and not data_root:
        raise UserError(f"task(s) {', '.join(rooted)} read their datasets from a folder: give --data-root DIR")
    if data is None:
        plain = [t.name for t in tasks if "data_root" not in t.needs]
        if plain:
            raise UserError(f"task(s) {', '.join(plain)} need --data (a dataset spec, see `ssl-bench list`)")
        return Dataset(name=data_name or Path(data_root).name, spec=f"root:{data_root}")
    return resolve_dataset(data, data_name)


def run_evaluation(
    tasks: str,
    model: str | None,
    data: str | None,
    ckpt: str | None = None,
    ckpt_key: str = "teacher",
    data_name: str | None = None,
    options: tuple[str, ...] = (),
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    precision: str = "auto",
    cache_dir: str | None = None,
    use_cache: bool = True,
    results: str = os.path.join(DEFAULT_RESULTS_DIR, DEFAULT_RESULTS_FILE),
    method: str = "",
    label: str | None = None,
    seed: int = 0,
    data_root: str | None = None,
    decode: str = "auto",
    skip_bad_images: bool = False,
) -> list:
    """Score one backbone on one dataset with one or more tasks and append the rows to ``results``."""
    from .backbones import create_backbone
    from .context import TaskContext
    from .registry import get_task, parse_params
    from .results import check_results_path, save_rows
    from .runner import run_tasks
    from .runtime import init_distributed, resolve_device, seed_everything

    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_names:
        raise UserError("--task is empty; expected one or more task names separated by commas")
    selected = [get_task(name) for name in task_names]
    per_task = _parse_task_options(options, task_names)
    params = [(task, parse_params(task, per_task[task.name])) for task in selected]
    check_results_path(results)  # a path that cannot take the rows fails now, not after the work
    torch_device = resolve_device(device)
    info = init_distributed(torch_device)
    seed_everything(seed)
    dataset = _resolve_data(selected, data, data_name, data_root)
    dataset.set_skip_bad_images(skip_bad_images)
    backbone = create_backbone(model, ckpt, ckpt_key, seed=seed)
    ctx = TaskContext(
        backbone=backbone, dataset=dataset, device=torch_device, batch_size=batch_size, workers=workers,
        precision=precision, cache_dir=Path(cache_dir) if cache_dir else None, use_cache=use_cache, decode=decode,
        method=method, model_label=label, extra={"results": results, **({"data_root": data_root} if data_root else {})},
    )
    rows = run_tasks(params, ctx)
    if info.is_main:
        save_rows(results, rows)  # on failure: the rows go to a fallback file named in the error
        log.info("%d rows appended to %s", len(rows), results)
    return rows


@cli.command("run")
@click.option("--task", "tasks", required=True, help="Task name(s), comma-separated (knn,fewshot).")
@click.option("--model", default=None, help="timm model name, e.g. vit_small_patch16_224 (optional for ssl-bench checkpoints).")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False), help="Checkpoint file; random init when absent.")
@click.option("--ckpt-key", default="teacher", type=click.Choice(["teacher", "student"]), show_default=True)
@click.option("--data", default=None, help="Dataset spec: builtin:digits, imagefolder:PATH or PATH.")
@click.option("--data-root", default=None, type=click.Path(file_okay=False),
              help="Folder under which retrieval / davis / transfer find their datasets.")
@click.option("--data-name", default=None, help="Name for the dataset in result rows (default: folder name).")
@click.option("-p", "--opt", "options", multiple=True, help="Task option key=value or task.key=value (repeatable).")
@click.option("--split-file", "split_files", multiple=True, type=click.Path(dir_okay=False),
              help="fewshot: a split file in MSN's line format (repeatable; same as -p fewshot.split_file=...).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True, type=click.IntRange(min=0))
@click.option("--precision", default="auto", type=click.Choice(["auto", "fp32", "bf16"]), show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--decode", default="auto", type=click.Choice(["auto", "cpu", "device"]), show_default=True,
              help="Where evaluation images are decoded and resized: device = batched on the GPU (nvjpeg), "
                   "cpu = PIL in the loader workers; auto = device on CUDA.")
@click.option("--cache-dir", default=None, help="Feature cache folder (default $SSL_BENCH_CACHE or ~/.cache/ssl-bench/features).")
@click.option("--no-cache", is_flag=True, help="Always run the model; store nothing.")
@click.option("--skip-bad-images", is_flag=True,
              help="Leave unreadable images of --data out of feature extraction (counted, warned about and "
                   "recorded in the rows' params) instead of stopping at the first one.")
@click.option("--results", default=os.path.join(DEFAULT_RESULTS_DIR, DEFAULT_RESULTS_FILE), show_default=True)
@click.option("--method", default="", help="Pretraining method recorded in rows (dino, dino-vmf, ...).")
@click.option("--label", default=None, help="Model name in rows (default: checkpoint file name, or arch at random init).")
@click.option("--seed", default=0, show_default=True)
def run_cmd(tasks, model, ckpt, ckpt_key, data, data_root, data_name, options, split_files, device, batch_size, workers,
            precision, decode, cache_dir, no_cache, skip_bad_images, results, method, label, seed) -> None:
    """Score a backbone with one or more tasks; rows are appended to the results CSV."""
    if split_files:
        options = (*options, f"fewshot.split_file={','.join(split_files)}")
    rows = run_evaluation(tasks, model, data, ckpt, ckpt_key, data_name, options, device, batch_size, workers,
                          precision, cache_dir, not no_cache, results, method, label, seed, data_root, decode,
                          skip_bad_images)
    for row in rows:
        click.echo(f"{row.task:<10} {row.dataset:<12} {row.metric:<14} {row.value:8.2f}")


def build_leaderboard(results_dir: str, task: str | None = None, dataset: str | None = None, metric: str | None = None):
    from .results import read_rows, result_files, write_leaderboard

    rows = [row for path in result_files(results_dir) for row in read_rows(path)]
    rows = [r for r in rows if (task is None or r.task == task) and (dataset is None or r.dataset == dataset)
            and (metric is None or r.metric == metric)]
    if not rows:
        raise UserError(f"no result rows in {results_dir}" + (" matching the filter" if task or dataset or metric else ""))
    return write_leaderboard(results_dir, rows)


@cli.command("leaderboard")
@click.option("--results-dir", default=DEFAULT_RESULTS_DIR, show_default=True)
@click.option("--task", default=None, help="Only rows of this task.")
@click.option("--dataset", default=None, help="Only rows of this dataset.")
@click.option("--metric", default=None, help="Only rows of this metric.")
def leaderboard_cmd(results_dir: str, task: str | None, dataset: str | None, metric: str | None) -> None:
    """Pivot every row CSV in the results folder to model x (task/dataset/metric); write leaderboard.csv and print it."""
    _print_leaderboard(results_dir, task, dataset, metric)


def _print_leaderboard(results_dir: str, task: str | None = None, dataset: str | None = None,
                       metric: str | None = None) -> None:
    from .results import format_table

    path, header, table = build_leaderboard(results_dir, task, dataset, metric)
    click.echo(format_table(header, table))
    click.echo(f"\nleaderboard written to {path}")


@cli.command("report")
@click.option("--study", required=True, type=click.Choice(["longtail"]),
              help="longtail: accuracy per class-frequency group (knn, linear) and unique prototypes, per model.")
@click.option("--results-dir", default=DEFAULT_RESULTS_DIR, show_default=True)
@click.option("--dataset", default=None, help="Only rows of this dataset (e.g. digits-lt, inat2018).")
@click.option("--unique-at", default=0.9, show_default=True, type=click.FloatRange(-1, 1),
              help="Cosine threshold of the unique-prototype column (a threshold the prototypes task ran).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Report folder (default: <results-dir>/reports).")
def report_cmd(study: str, results_dir: str, dataset: str | None, unique_at: float, out_dir: str | None) -> None:
    """Write a study's CSV and PNG plot from the result rows in the results folder, and print the table."""
    from .report import LONGTAIL_COLUMNS, as_text, write_longtail_report
    from .results import format_table

    csv_path, png_path, records = write_longtail_report(results_dir, out_dir, dataset, unique_at)
    shown = [c for c in LONGTAIL_COLUMNS if c not in ("method", "many_shot", "few_shot", "unique_at")]
    click.echo(format_table(shown, as_text(records)))
    click.echo(f"\n{study} report: {csv_path} and {png_path}")


DEMO_DATA = "builtin:digits"  # what the tiny preset is sized for; builtin:shapes awaits a CPU recipe that learns
DEMO_PRESET = "tiny_cpu"


def _knn_epoch_hook(data: str, size: int, device: str):
    """The demo's per-epoch probe: weighted kNN top-1 (k = 20) of the teacher backbone's [CLS] on ``data``'s val
    split, its train split as the memory bank; images are transformed once, the backbone runs each epoch."""
    import torch

    from ssl_bench.tasks.knn import knn_classify

    from .data import resolve_dataset, stack_images
    from .runtime import resolve_device
    from .transforms import TransformSpec

    dataset, transform = resolve_dataset(data), TransformSpec("eval_dino", size).build()
    torch_device = resolve_device(device)
    splits = {name: (stack_images(dataset.split(name), transform), torch.as_tensor(dataset.split(name).labels))
              for name in ("train", "val")}

    def hook(backbone) -> dict[str, float]:
        features = {name: torch.cat([backbone(batch.to(torch_device)).float().cpu() for batch in images.split(256)])
                    for name, (images, _) in splits.items()}
        accuracy = knn_classify(features["train"], splits["train"][1], features["val"], splits["val"][1], ks=(20,))
        return {"knn_top1": accuracy[20][0]}

    return hook


@cli.command("demo")
@click.option("--results-dir", default=DEFAULT_RESULTS_DIR, show_default=True)
@click.option("--runs-dir", default="runs", show_default=True, help="Where the demo's pretraining run is kept.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Pretraining epochs (default: the tiny_cpu preset's).")
@click.option("--device", default="auto", show_default=True)
@click.option("--cache-dir", default=None, help="Feature cache folder.")
def demo_cmd(results_dir: str, runs_dir: str, epochs: int | None, device: str, cache_dir: str | None) -> None:
    """The main job on the built-in data: pretrain the tiny DINO-vMF preset on builtin:digits (kNN logged every
    epoch), score it, the same backbone at random init and raw pixels with kNN and a linear probe, print a verdict,
    plot the training curves and write the leaderboard. A finished or interrupted run is resumed."""
    from ssl_bench.pretrain.config import make_config
    from ssl_bench.pretrain.trainer import LOG_NAME, pretrain

    from .demo import demo_verdict, read_log, save_demo_curves

    config = make_config(DEMO_PRESET, {"epochs": str(epochs)} if epochs else {})
    out_dir = Path(runs_dir) / f"demo-{DEMO_PRESET}-{config.epochs}ep"
    hook = _knn_epoch_hook(DEMO_DATA, config.global_size, device)
    checkpoint = pretrain(config, DEMO_DATA, out_dir, resume=True, device=device, epoch_hook=hook)
    results = os.path.join(results_dir, DEFAULT_RESULTS_FILE)
    common = dict(device=device, workers=0, cache_dir=cache_dir, results=results, options=("linear.fast=true",))
    pretrained = f"{config.arch} {config.method} {DEMO_PRESET} {config.epochs}ep (demo)"
    rows = run_evaluation("knn,linear", None, DEMO_DATA, ckpt=str(checkpoint), method=config.method,
                          label=pretrained, **common)
    rows += run_evaluation("knn,linear", config.arch, DEMO_DATA, **common)  # labelled "(random init, seed 0)"
    rows += run_evaluation("knn,linear", "pixels", DEMO_DATA, **common)
    _print_leaderboard(results_dir, dataset=rows[0].dataset)
    records = read_log(out_dir / LOG_NAME)
    plot = save_demo_curves(Path(results_dir) / "demo_training.png", records)
    click.echo(f"training curves: {plot}")
    for line in demo_verdict(rows, records, pretrained, config.method):
        click.echo(line)


@cli.command("pretrain", context_settings={"ignore_unknown_options": False})
@click.option("--preset", default=None, help="Preset name (see `ssl-bench list`); not needed with --resume.")
@click.option("--data", required=True, help="Dataset spec whose train split is used (labels ignored).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--device", default="auto", show_default=True)
@click.argument("overrides", nargs=-1)
def pretrain_cmd(preset: str | None, data: str, out_dir: str, resume: bool, device: str, overrides: tuple[str, ...]) -> None:
    """Pretrain with DINO / DINO-vMF. OVERRIDES are key=value settings on top of the preset (epochs=10 lr=1e-3)."""
    from ssl_bench.pretrain.config import make_config
    from ssl_bench.pretrain.trainer import CONFIG_NAME, pretrain

    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r}; expected key=value")
        values[key] = value
    saved = Path(out_dir) / CONFIG_NAME
    if resume and saved.is_file():
        config = make_config(None, values, from_file=saved)
    elif preset:
        config = make_config(preset, values)
    else:
        raise UserError("--preset is required for a new run (see `ssl-bench list` for the presets)")
    checkpoint = pretrain(config, data, out_dir, resume=resume, device=device)
    click.echo(f"checkpoint: {checkpoint}")


def main() -> None:
    cli(prog_name="ssl-bench")


if __name__ == "__main__":
    main()
