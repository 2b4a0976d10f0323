"""Task registry: each module in ``ssl_bench.tasks`` registers its protocol by name; the core names none of them."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError
from .options import parse_fields


@dataclass(frozen=True)
class Task:
    """An evaluation protocol: ``run(ctx, params)`` returns result rows and writes nothing itself."""

    name: str
    version: str  # protocol version, recorded in every row
    description: str
    params: type  # a dataclass whose fields (with defaults) are the task's options
    run: Callable[..., list]
    needs: tuple[str, ...] = ("labels",)
    check: Callable[[Any], None] | None = None  # raises UserError on a bad option; runs before any model or data


_TASKS: dict[str, Task] = {}
_discovered = False


def register_task(name: str, version: str, description: str, params: type, needs: tuple[str, ...] = ("labels",),
                  check: Callable[[Any], None] | None = None):
    """Decorator for ``run(ctx: TaskContext, params) -> list[ResultRow]``. ``check(params)`` validates the options
    (ranges, names) without touching a model or data, so a bad option fails before any expensive work."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"task {name}: params must be a dataclass")

    def wrap(run: Callable[..., list]) -> Callable[..., list]:
        _TASKS[name] = Task(name, version, description, params, run, needs, check)
        return run

    return wrap


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import ssl_bench.tasks as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _discovered = True


def all_tasks() -> dict[str, Task]:
    _discover()
    return dict(sorted(_TASKS.items()))


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise UserError(f"unknown task {name!r}; valid: {', '.join(tasks)}")
    return tasks[name]


def check_params(task: Task, params: Any) -> None:
    """Run the task's option checks (a UserError on a bad value); cheap, so callers run it before any work."""
    if task.check is not None:
        task.check(params)


def parse_params(task: Task, values: dict[str, str]) -> Any:
    """Build the task's params dataclass from ``key=value`` strings, converting by field type, and check them."""
    params = task.params(**parse_fields(task.params, values, f"task {task.name}"))
    check_params(task, params)
    return params
