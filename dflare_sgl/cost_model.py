"""What a decoding step costs, by verify length n and batch size b: the speculative policy's
price list (:mod:`dflare_sgl.verify_length`).

A step that verifies ``n`` tokens (``x_last`` plus ``n - 1`` drafts) for ``b`` requests runs
the draft pass (none for ``n = 1``), the target pass over ``[b, n]`` tokens, verification and
the draft-context write. Its time relative to a plain one-token step at the same ``b`` is what
decides whether drafting pays: on a GPU a pass over 8 tokens costs about one token's until the
batch fills the device, on CPU it grows with ``n`` almost from the start.

The numbers come from a short calibration on the machine itself (``dflare calibrate``, or
automatically the first time an adaptive decoder runs) and are cached as a small JSON file
under ``$DFLARE_CACHE/cost_models/``, one per :func:`key`: the device, the target's and the
draft's shapes, the dtype, the thread count and the linear kernel. The file reads like this
and can be passed back with ``--cost-model FILE`` (the spirit of SGLang's
``--speculative-adaptive-config``)::

    {"format": "dflare-cost-model/1",
     "key": {"device": "cpu:AMD EPYC 7B13", "target": "llama L30 H576 V49152", ...},
     "batch_sizes": [1, 2, 4, 8, 16],
     "lengths": [1, 2, 3, 4, 6, 8],
     "step_ms": [[31.2, 33.0, ...], ...]}     # step_ms[i][j]: n = lengths[i], b = batch_sizes[j]

Costs between measured points are interpolated linearly (in n and in b); past the ends the
nearest measured value is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dflare_sgl.request import SamplingParams
from dflare_sgl.skinny_linear import SkinnyLinear
from dflare_sgl.verify_length import CyclingVerifyLength

FORMAT = "dflare-cost-model/1"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:  # the model name is what tells two CPUs apart; /proc/cpuinfo has it on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}:{name}"


def key(
    target_config, draft_config, device: torch.device, dtype: torch.dtype, kernel: str
) -> dict[str, str | int]:
    """What a cost model is valid for. Shapes rather than paths name the models, so a file
    calibrated for a model still fits it when the model folder moves."""
    t, d = target_config, draft_config
    return {
        "device": _device_name(device),
        "target": f"{t.model_type} L{t.num_hidden_layers} H{t.hidden_size} "
        f"I{getattr(t, 'intermediate_size', 0)} V{t.vocab_size}",
        "draft": f"{d.fusion} L{d.num_hidden_layers} T{len(d.target_layer_ids)} "
        f"V{d.draft_vocab_size or t.vocab_size}",
        "dtype": str(dtype).removeprefix("torch."),
        # torch's thread count changes CPU costs a lot and GPU costs not at all.
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "kernel": kernel,
    }


@dataclass(frozen=True)
class CostModel:
    """Measured step times: ``step_ms[i][j]`` for verify length ``lengths[i]`` and batch size
    ``batch_sizes[j]`` (``lengths[0] == 1``, both increasing)."""

    key: dict
    batch_sizes: tuple[int, ...]
    lengths: tuple[int, ...]
    step_ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        def increasing(xs: Sequence[int]) -> bool:
            return len(xs) > 0 and all(isinstance(x, int) and x >= 1 for x in xs) and all(
                a < b for a, b in zip(xs, xs[1:])
            )

        if not increasing(self.batch_sizes) or not increasing(self.lengths):
            raise ValueError("batch_sizes and lengths must be increasing lists of integers >= 1")
        if self.lengths[0] != 1:
            raise ValueError("lengths must start at 1 (the plain one-token step)")
        shape = (len(self.lengths), len(self.batch_sizes))
        if np.shape(self.step_ms) != shape:
            raise ValueError(f"step_ms must be {shape[0]} rows (lengths) x {shape[1]} (batch sizes)")
        if not all(np.isfinite(v) and v > 0 for row in self.step_ms for v in row):
            raise ValueError("step_ms must hold positive finite times")

    @property
    def max_length(self) -> int:
        return self.lengths[-1]

    def step_time(self, n: int, b: int) -> float:
        """Milliseconds of one step verifying ``n`` tokens for ``b`` requests."""
        per_length = [np.interp(b, self.batch_sizes, row) for row in self.step_ms]
        return float(np.interp(n, self.lengths, per_length))

    def relative(self, n: int, b: int) -> float:
        """A step verifying ``n`` tokens over a plain one-token step, both at batch ``b``."""
        return self.step_time(n, b) / self.step_time(1, b)

    # -- files -------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "key": self.key,
            "batch_sizes": list(self.batch_sizes),
            "lengths": list(self.lengths),
            "step_ms": [[round(v, 4) for v in row] for row in self.step_ms],
        }
        return json.dumps(data, indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # readers never see half a file
        return path

    @classmethod
    def load(cls, path: str | Path, expect_key: dict | None = None) -> CostModel:
        """Read a cost model file; ``expect_key`` refuses one made for another setting."""
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            model = cls(
                key=dict(data["key"]),
                batch_sizes=tuple(data["batch_sizes"]),
                lengths=tuple(data["lengths"]),
                step_ms=tuple(tuple(float(v) for v in row) for row in data["step_ms"]),
            )
        except OSError as e:
            raise ValueError(f"cannot read cost model {path}: {e}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cost model {path} is malformed ({e}): re-create it with `dflare calibrate`"
            ) from e
        if expect_key is not None:
            model.check_key(expect_key, f"cost model {path}")
        return model

    def check_key(self, expect_key: dict, what: str) -> None:
        """Refuse to price a setting other than the one measured."""
        if self.key != expect_key:
            diff = ", ".join(
                f"{k} {self.key.get(k)!r} != {v!r}"
                for k, v in expect_key.items()
                if self.key.get(k) != v
            )
            raise ValueError(
                f"{what} was calibrated for another setting ({diff}): calibrate this one with "
                "`dflare calibrate`"
            )


def decoder_key(decoder) -> dict[str, str | int]:
    """:func:`key` of a :class:`~dflare_sgl.engine.SpeculativeDecoder`'s setting."""
    skinny = any(isinstance(m, SkinnyLinear) for m in decoder.target.modules())
    return key(
        decoder.target.config,
        decoder.draft.config,
        decoder.device,
        next(decoder.target.parameters()).dtype,
        "skinny_linear" if skinny else "torch",
    )


def measure_steps_ms(
    decoder, lengths: Sequence[int], batch_size: int, rounds: int = 6, prompt_len: int = 192
) -> dict[int, float]:
    """Median milliseconds of one of ``decoder``'s steps verifying ``n`` tokens for
    ``batch_size`` requests, for each ``n`` in ``lengths``.

    One batch of random-token prompts of a typical chat length decodes with the lengths in
    turn, ``rounds`` times (after a warm-up round), so that a slow spell of the machine
    touches every length alike and the prefill is paid once.
    """
    g = torch.Generator().manual_seed(batch_size)
    vocab = decoder.target.config.vocab_size
    prompts = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).tolist()
    times: dict[int, list[float]] = {n: [] for n in lengths}
    steps = 0

    def record(n: int, b: int, seconds: float) -> None:
        nonlocal steps
        steps += 1
        # The first round warms up; a step after a request finished early (accepted drafts
        # reach the budget sooner) has a smaller batch.
        if steps > len(lengths) and b == batch_size:
            times[n].append(seconds)

    # Each step commits at least one token: the budget ends the run after the last round
    # (sooner for a request whose drafts were accepted, which is rare on random tokens).
    scheduled = (rounds + 1) * len(lengths)
    decoder.generate(
        prompts,
        SamplingParams(max_new_tokens=scheduled),
        verify_length=CyclingVerifyLength(lengths),
        on_step=record,
    )
    if not all(times.values()):
        raise RuntimeError(f"calibration at batch {batch_size} timed no step of some length")
    return {n: 1000.0 * statistics.median(t) for n, t in times.items()}


def default_lengths(max_length: int) -> tuple[int, ...]:
    """Verify lengths to time up to ``max_length``: every one to 4, then doubling (the cost is
    close to linear in between)."""
    lengths = list(range(1, min(max_length, 4) + 1))
    while lengths[-1] * 2 <= max_length:
        lengths.append(lengths[-1] * 2)
    if lengths[-1] != max_length:
        lengths.append(max_length)
    return tuple(lengths)


def default_batch_sizes(device: torch.device, max_batch: int | None = None) -> tuple[int, ...]:
    top = max_batch or (16 if device.type == "cpu" else 64)
    sizes = [1]
    while sizes[-1] * 2 <= top:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def calibrate(
    measure_ms: Callable[[Sequence[int], int], dict[int, float]],
    key: dict,
    lengths: Sequence[int],
    batch_sizes: Sequence[int],
    progress: bool = True,
) -> CostModel:
    """``measure_ms(lengths, b)``: milliseconds of one step by verify length, at batch ``b``
    (:func:`measure_steps_ms`), for each batch size."""
    times = {
        b: measure_ms(lengths, b)
        for b in tqdm(batch_sizes, desc="dflare: calibrating step costs", disable=not progress)
    }
    step_ms = tuple(tuple(times[b][n] for b in batch_sizes) for n in lengths)
    return CostModel(dict(key), tuple(batch_sizes), tuple(lengths), step_ms)


def cache_path(model_key: dict, cache_dir: str | Path | None = None) -> Path:
    from dflare_sgl.target import cache_root

    digest = hashlib.sha256(json.dumps(model_key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "cost_models" / f"{digest}.json"


def load_or_calibrate(
    model_key: dict,
    measure_ms: Callable[[Sequence[int], int], dict[int, float]],
    lengths: Sequence[int],
    batch_sizes: Sequence[int],
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> CostModel:
    """The cached cost model for ``model_key`` if it covers ``lengths`` and ``batch_sizes``
    (and ``use_cache``), else a new one, calibrated now and cached."""
    path = cache_path(model_key, cache_dir)
    if use_cache and path.exists():
        try:
            model = CostModel.load(path, expect_key=model_key)
            if model.max_length >= max(lengths) and model.batch_sizes == tuple(batch_sizes):
                return model
        except ValueError:
            pass  # a broken or stale cache entry is re-made, not an error
    model = calibrate(measure_ms, model_key, lengths, batch_sizes)
    model.save(path)
    return model
