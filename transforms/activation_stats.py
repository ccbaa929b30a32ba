"""Exact, mergeable statistics of one (hook, layer) of activations (schema: docs/format.md, "Statistics").

`compute` reduces one shard's activation matrix (in its storage dtype) and token columns to a `LayerStats`;
`merge` combines two of them. Everything a merge touches is a count, a float64 sum, a min, a max, a histogram on
one global bin table, or a top-k list under a total order, so a merge is exact for counts, extrema, histograms
and top-k, and adds float64 sums (exact up to one float64 rounding per addition). Means and variances are derived
at the end from the merged count, sum and sum of squares: that is Chan's parallel formula written in pooled
form (M2 = sumsq - sum^2 / n), so no mean of batch means is ever taken. Sums of squares are kept rather than
per-shard M2 because the writer then needs one pass over the values and the merge is pure addition; in float64
over values of at most float32 precision the cancellation in sumsq - sum^2 / n costs about log10(mean^2 / var)
of float64's 15-16 digits, which matters only for dimensions whose mean dwarfs their spread by many orders.

Values that are not finite (NaN, inf: float16 overflows or a model's own) are counted and left out of every sum,
extremum and norm; a token with any non-finite value has no norm and is counted in `norm_non_finite`.
The pass over the values runs compiled (transforms.stats_kernel: one fused loop, checked against numpy when it
loads) where a C compiler is at hand and in numpy otherwise; both give the same norms, extrema, counts and
histograms bit for bit and the same sums to float64 rounding. pyarrow only in `from_arrow`, which reads the
columns of an activation table.
"""
from __future__ import annotations

import base64
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import orjson

from transforms import stats_kernel
from transforms.output_format import STATS_DIR  # noqa: F401 - the folder of per-shard statistics files

from transforms.annotations import PART_NAMES

SCHEMA_VERSION = 1
TOP_K = 32
# Norm histogram: bin edges 2**(e + j / BINS_PER_OCTAVE) for e in [MIN_OCTAVE, MAX_OCTAVE). Each edge is a power
# of two times an iterated square root of a power of two, and IEEE square roots are correctly rounded, so every
# machine computes the same edges bit for bit and histograms of different shards and hosts add.
BINS_PER_OCTAVE = 16
MIN_OCTAVE = -16
MAX_OCTAVE = 24
# Extra bins around the log-spaced ones: [0] zero norm, [1] 0 < norm < first edge, [-1] norm >= last edge.
ZERO_BIN, UNDERFLOW_BIN, OVERFLOW_BIN = 0, 1, -1
_BLOCK_ROWS = 128  # rows widened to float64 at a time: the block stays in cache across the passes over it
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_KERNEL_DTYPES = (_BFLOAT16, np.dtype(np.float16), np.dtype(np.float32))


def _octave_fractions() -> np.ndarray:
    fractions = []
    for j in range(BINS_PER_OCTAVE):
        value = 2.0 ** j
        for _ in range(int(math.log2(BINS_PER_OCTAVE))):
            value = math.sqrt(value)
        fractions.append(value)
    return np.array(fractions)


def histogram_edges() -> np.ndarray:
    """The global norm-histogram edges (ascending float64), identical on every machine."""
    octaves = np.arange(MIN_OCTAVE, MAX_OCTAVE, dtype=np.float64)
    edges = (np.ldexp(1.0, octaves.astype(int))[:, None] * _octave_fractions()[None, :]).ravel()
    return np.append(edges, np.ldexp(1.0, MAX_OCTAVE))


EDGES = histogram_edges()
NUM_BINS = len(EDGES) - 1 + 3
HISTOGRAM_SPEC = {"kind": "log2", "bins_per_octave": BINS_PER_OCTAVE, "min_octave": MIN_OCTAVE,
                  "max_octave": MAX_OCTAVE, "extra_bins": ["zero", "underflow", "overflow"]}


def histogram_bin(norms: np.ndarray) -> np.ndarray:
    """Bin index of each finite, non-negative norm: 0 zero, 1 underflow, 2.. log bins, last overflow."""
    index = np.searchsorted(EDGES, norms, side="right") + 1  # EDGES[0] <= n < EDGES[1] -> 2
    index[norms == 0] = ZERO_BIN
    return index


def bin_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper norm of every bin (zero bin: 0, 0; underflow: 0, EDGES[0]; overflow: EDGES[-1], inf)."""
    lower = np.concatenate([[0.0, 0.0], EDGES[:-1], [EDGES[-1]]])
    upper = np.concatenate([[0.0], EDGES, [np.inf]])
    return lower, upper


@dataclass
class Group:
    """Tokens of one prompt part, grid cell or colour: how many, how many have a norm, and the sum of those."""
    tokens: int = 0
    finite: int = 0
    norm_sum: float = 0.0

    @property
    def mean_norm(self) -> float | None:
        return self.norm_sum / self.finite if self.finite else None


class Groups(Mapping):
    """Groups of one kind (prompt parts, grid cells or colours) as columns: their names in text order and, per
    name, tokens, tokens with a norm and the sum of those norms. Read as a mapping of name to `Group`; kept as
    arrays because a layer has up to 900 grid cells, and one object per cell, layer and shard cost more than the
    writer's whole share of the statistics."""

    __slots__ = ("names", "tokens", "finite", "norm_sum", "_positions")

    def __init__(self, names: Sequence[str] = (), tokens=(), finite=(), norm_sum=()):
        self.names = tuple(names)
        self.tokens = np.asarray(tokens, np.int64).reshape(-1)
        self.finite = np.asarray(finite, np.int64).reshape(-1)
        self.norm_sum = np.asarray(norm_sum, np.float64).reshape(-1)
        self._positions = None
        if not len(self.names) == len(self.tokens) == len(self.finite) == len(self.norm_sum):
            raise ValueError("group names, tokens, finite and norm_sum differ in length")

    @classmethod
    def from_groups(cls, groups: Mapping[str, Group]) -> "Groups":
        if isinstance(groups, Groups):
            return groups
        names = sorted(groups)
        return cls(names, [groups[k].tokens for k in names], [groups[k].finite for k in names],
                   [groups[k].norm_sum for k in names])

    def _index(self) -> dict[str, int]:
        if self._positions is None:
            self._positions = {name: i for i, name in enumerate(self.names)}
        return self._positions

    def __getitem__(self, name: str) -> Group:
        i = self._index()[name]
        return Group(int(self.tokens[i]), int(self.finite[i]), float(self.norm_sum[i]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self._index()

    def __repr__(self) -> str:
        return f"Groups({dict(self.items())!r})"

    def merge(self, other: Mapping[str, Group]) -> "Groups":
        """Per name: tokens and finite added, norm sums added (self's first), names of either kept."""
        other = Groups.from_groups(other)
        if self.names == other.names:
            return Groups(self.names, self.tokens + other.tokens, self.finite + other.finite,
                          self.norm_sum + other.norm_sum)
        names = sorted(set(self.names) | set(other.names))
        where = {name: i for i, name in enumerate(names)}
        mine = np.fromiter((where[k] for k in self.names), np.int64, len(self.names))
        theirs = np.fromiter((where[k] for k in other.names), np.int64, len(other.names))
        tokens, finite, sums = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64), np.zeros(len(names))
        for into, a, b in ((tokens, self.tokens, other.tokens), (finite, self.finite, other.finite),
                           (sums, self.norm_sum, other.norm_sum)):
            into[mine] = a
            into[theirs] += b
        return Groups(names, tokens, finite, sums)

    def to_json(self) -> dict:
        return {"keys": list(self.names), "tokens": self.tokens.tolist(), "finite": self.finite.tolist(),
                "norm_sum": _floats(self.norm_sum)}

    @classmethod
    def from_json(cls, data: dict) -> "Groups":
        names = [str(k) for k in data["keys"]]
        groups = cls(names, data["tokens"], data["finite"], _array(data["norm_sum"], len(names)))
        if len(set(names)) != len(names):
            raise ValueError("group keys repeat")
        if names != sorted(names):
            order = sorted(range(len(names)), key=names.__getitem__)
            groups = cls([names[i] for i in order], groups.tokens[order], groups.finite[order],
                         groups.norm_sum[order])
        return groups


@dataclass
class TopToken:
    norm: float
    sample_id: str
    position: int
    token_id: int
    part: str

    def key(self):
        # Total order: larger norm first, then sample and position, so merging in any order keeps the same k.
        return (-self.norm, self.sample_id, self.position)


@dataclass
class LayerStats:
    hook: str
    layer: int
    d_model: int
    storage_dtype: str
    shards: int = 0
    tokens: int = 0
    non_finite: int = 0
    float16_overflow: int = 0
    dim_sum: np.ndarray = None
    dim_sumsq: np.ndarray = None
    dim_min: np.ndarray = None
    dim_max: np.ndarray = None
    dim_non_finite: np.ndarray = None
    norm_count: int = 0
    norm_sum: float = 0.0
    norm_sumsq: float = 0.0
    norm_min: float = math.inf
    norm_max: float = -math.inf
    norm_non_finite: int = 0
    histogram: np.ndarray = None
    top: list = field(default_factory=list)
    by_part: Groups = field(default_factory=Groups)
    by_cell: Groups = field(default_factory=Groups)
    by_color: Groups = field(default_factory=Groups)

    def __post_init__(self):
        d = self.d_model
        if self.dim_sum is None:
            self.dim_sum, self.dim_sumsq = np.zeros(d), np.zeros(d)
        if self.dim_min is None:
            self.dim_min, self.dim_max = np.full(d, np.inf), np.full(d, -np.inf)
        if self.dim_non_finite is None:
            self.dim_non_finite = np.zeros(d, np.int64)
        if self.histogram is None:
            self.histogram = np.zeros(NUM_BINS, np.int64)
        self.by_part, self.by_cell, self.by_color = (Groups.from_groups(g) for g in
                                                     (self.by_part, self.by_cell, self.by_color))

    @property
    def key(self) -> tuple[str, int]:
        return self.hook, self.layer

    # ---------------------------------------------------------------------------------------------- derived

    def dim_count(self) -> np.ndarray:
        return self.tokens - self.dim_non_finite

    def dim_mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.dim_sum / self.dim_count()

    def dim_var(self) -> np.ndarray:
        """Population variance per dimension: (sumsq - sum^2 / n) / n, clipped at 0 against rounding."""
        n = self.dim_count()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.maximum(self.dim_sumsq - self.dim_sum * self.dim_sum / n, 0.0) / n

    def mean_norm(self) -> float | None:
        return self.norm_sum / self.norm_count if self.norm_count else None

    def norm_std(self) -> float | None:
        if not self.norm_count:
            return None
        mean = self.norm_sum / self.norm_count
        return math.sqrt(max(self.norm_sumsq / self.norm_count - mean * mean, 0.0))

    def saelens_scale(self) -> float | None:
        """SAELens' normalisation factor sqrt(d_model) / mean norm: scaled activations have mean norm sqrt(d)."""
        mean = self.mean_norm()
        return math.sqrt(self.d_model) / mean if mean else None

    def norm_percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of the norm, from the histogram: geometric interpolation in its bin."""
        total = int(self.histogram.sum())
        if not total:
            return None
        if q <= 0 or q >= 100:
            return self.norm_min if q <= 0 else self.norm_max
        target = q / 100.0 * total
        cumulative = np.cumsum(self.histogram)
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, len(cumulative) - 1)
        lower, upper = bin_bounds()
        low, high = lower[index], upper[index]
        if index == ZERO_BIN:
            return 0.0
        if index == NUM_BINS - 1:
            return float(max(low, self.norm_max))
        if index == UNDERFLOW_BIN:
            return float(high)
        before = cumulative[index - 1] if index else 0
        fraction = (target - before) / self.histogram[index] if self.histogram[index] else 0.0
        value = low * (high / low) ** min(max(fraction, 0.0), 1.0)
        return float(min(max(value, self.norm_min), self.norm_max))

    # ------------------------------------------------------------------------------------------------ merge

    def merge(self, other: "LayerStats") -> "LayerStats":
        if (self.hook, self.layer, self.d_model) != (other.hook, other.layer, other.d_model):
            raise ValueError(f"cannot merge statistics of {self.hook}/{self.layer} (d_model {self.d_model}) with "
                             f"{other.hook}/{other.layer} (d_model {other.d_model})")
        if self.storage_dtype != other.storage_dtype:
            raise ValueError(f"{self.hook}/{self.layer}: statistics of {self.storage_dtype} and "
                             f"{other.storage_dtype} storage do not merge (one output holds one storage dtype)")
        top = sorted(self.top + other.top, key=TopToken.key)[:TOP_K]
        return LayerStats(
            hook=self.hook, layer=self.layer, d_model=self.d_model, storage_dtype=self.storage_dtype,
            shards=self.shards + other.shards, tokens=self.tokens + other.tokens,
            non_finite=self.non_finite + other.non_finite,
            float16_overflow=self.float16_overflow + other.float16_overflow,
            dim_sum=self.dim_sum + other.dim_sum, dim_sumsq=self.dim_sumsq + other.dim_sumsq,
            dim_min=np.minimum(self.dim_min, other.dim_min), dim_max=np.maximum(self.dim_max, other.dim_max),
            dim_non_finite=self.dim_non_finite + other.dim_non_finite,
            norm_count=self.norm_count + other.norm_count, norm_sum=self.norm_sum + other.norm_sum,
            norm_sumsq=self.norm_sumsq + other.norm_sumsq, norm_min=min(self.norm_min, other.norm_min),
            norm_max=max(self.norm_max, other.norm_max), norm_non_finite=self.norm_non_finite + other.norm_non_finite,
            histogram=self.histogram + other.histogram, top=top,
            by_part=self.by_part.merge(other.by_part), by_cell=self.by_cell.merge(other.by_cell),
            by_color=self.by_color.merge(other.by_color))

    # ---------------------------------------------------------------------------------------- serialisation

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; floats are written as their shortest round-trip decimal, non-finite ones as
        strings."""
        mean = self.mean_norm()
        return {
            "hook": self.hook, "layer": self.layer, "d_model": self.d_model, "storage_dtype": self.storage_dtype,
            "shards": self.shards, "tokens": self.tokens, "non_finite": self.non_finite,
            "float16_overflow": self.float16_overflow,
            "dim": {"sum": _floats(self.dim_sum), "sumsq": _floats(self.dim_sumsq), "min": _floats(self.dim_min),
                    "max": _floats(self.dim_max),
                    "non_finite": {str(i): int(self.dim_non_finite[i]) for i in np.flatnonzero(self.dim_non_finite)}},
            "norm": {"count": self.norm_count, "sum": _float(self.norm_sum), "sumsq": _float(self.norm_sumsq),
                     "min": _float(self.norm_min), "max": _float(self.norm_max), "non_finite": self.norm_non_finite,
                     "histogram": {str(i): int(self.histogram[i]) for i in np.flatnonzero(self.histogram)}},
            "top": [{"norm": _float(t.norm), "sample_id": t.sample_id, "position": t.position,
                     "token_id": t.token_id, "part": t.part} for t in self.top],
            "by_part": self.by_part.to_json(), "by_cell": self.by_cell.to_json(),
            "by_color": self.by_color.to_json(),
            "derived": {"mean_norm": _float(mean), "norm_std": _float(self.norm_std()),
                        "saelens_scale": _float(self.saelens_scale())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "statistics") -> "LayerStats":
        try:
            d_model = int(data["d_model"])
            dim, norm = data["dim"], data["norm"]
            stats = cls(
                hook=str(data["hook"]), layer=int(data["layer"]), d_model=d_model,
                storage_dtype=str(data["storage_dtype"]), shards=int(data["shards"]), tokens=int(data["tokens"]),
                non_finite=int(data["non_finite"]), float16_overflow=int(data["float16_overflow"]),
                dim_sum=_array(dim["sum"], d_model), dim_sumsq=_array(dim["sumsq"], d_model),
                dim_min=_array(dim["min"], d_model), dim_max=_array(dim["max"], d_model),
                dim_non_finite=_sparse(dim["non_finite"], d_model),
                norm_count=int(norm["count"]), norm_sum=float(norm["sum"]), norm_sumsq=float(norm["sumsq"]),
                norm_min=float(norm["min"]), norm_max=float(norm["max"]), norm_non_finite=int(norm["non_finite"]),
                histogram=_sparse(norm["histogram"], NUM_BINS),
                top=[TopToken(float(t["norm"]), str(t["sample_id"]), int(t["position"]), int(t["token_id"]),
                              str(t["part"])) for t in data["top"]],
                by_part=Groups.from_json(data["by_part"]), by_cell=Groups.from_json(data["by_cell"]),
                by_color=Groups.from_json(data["by_color"]))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{where}: not a statistics record of schema {SCHEMA_VERSION} "
                             f"({type(error).__name__}: {error}); rebuild it with python -m pipeline.stats --write") \
                from error
        return stats


def _float(value) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # "inf", "-inf", "nan": strict JSON has no such numbers


def _floats(values: np.ndarray) -> str:
    """float64 values as base64 of their little-endian bytes: lossless, and fast to write and read back, where
    decimal text of every per-dimension number cost more than computing it."""
    return base64.b64encode(np.ascontiguousarray(values, "<f8").tobytes()).decode("ascii")


def _array(text: str, length: int) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(text, validate=True), "<f8").astype(np.float64)
    if array.shape != (length,):
        raise ValueError(f"expected {length} float64 values, found {array.shape[0]}")
    return array


def _sparse(mapping: dict, length: int) -> np.ndarray:
    array = np.zeros(length, np.int64)
    for index, count in mapping.items():
        array[int(index)] = int(count)
    return array


# ------------------------------------------------------------------------------------------------ compute

@functools.lru_cache(maxsize=64)
def _key_names(kind: str, size: int, width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Names of group keys 0..size-1 (an object array) and the keys in the names' text order: made once, not per
    key, shard and layer (a shard of 24 layers with 900 grid cells would otherwise format 21,600 names)."""
    if kind == "part":
        names = list(PART_NAMES[:size])
    elif kind == "cell":
        names = [f"{k // width},{k % width}" for k in range(size)]
    else:
        names = [str(k) for k in range(size)]
    return np.array(names, dtype=object), np.array(sorted(range(size), key=names.__getitem__), np.int64)


def _group_stats(keys: np.ndarray, norms: np.ndarray, finite: np.ndarray, kind: str, width: int = 1) -> Groups:
    """Groups per key (non-negative ints): tokens, tokens with a norm, their norm sum; keys named by _key_names."""
    if not keys.size:
        return Groups()
    size = int(keys.max()) + 1
    names, text_order = _key_names(kind, size, width)
    tokens = np.bincount(keys, minlength=size)
    counted = np.bincount(keys, weights=finite, minlength=size)
    sums = np.bincount(keys, weights=np.where(finite, norms, 0.0), minlength=size)
    present = text_order[tokens[text_order] > 0]
    return Groups(names[present].tolist(), tokens[present], counted[present].astype(np.int64), sums[present])


def _kernel_pass(activation: np.ndarray, stats: LayerStats) -> np.ndarray | None:
    """The compiled single pass (transforms.stats_kernel) for bfloat16, float16 and float32 storage; None when
    it is not available for this array."""
    kernel = stats_kernel.load()
    if kernel is None or activation.dtype not in _KERNEL_DTYPES:
        return None
    if activation.dtype == np.float16:
        activation = activation.astype(np.float32)  # exact
    kind = "bf16" if activation.dtype == _BFLOAT16 else "f32"
    raw = np.ascontiguousarray(activation).view(np.uint16 if kind == "bf16" else np.float32)
    mn, mx, stats.dim_sum, stats.dim_sumsq, row_sumsq = kernel(raw, kind)
    stats.dim_min, stats.dim_max = mn.astype(np.float64), mx.astype(np.float64)
    return row_sumsq


def _numpy_pass(activation: np.ndarray, stats: LayerStats) -> np.ndarray:
    """The same as _kernel_pass in numpy: blocks of rows widened to float64 (exact) and reduced."""
    n, d = activation.shape
    row_sumsq = np.empty(n)
    buffer, squares = np.empty((min(_BLOCK_ROWS, n), d)), np.empty((min(_BLOCK_ROWS, n), d))
    for start in range(0, n, _BLOCK_ROWS):
        m = min(_BLOCK_ROWS, n - start)
        block = buffer[:m]
        block[...] = activation[start:start + m]  # bf16 / f16 / f32 -> f64 is exact
        np.minimum(stats.dim_min, block.min(0), out=stats.dim_min)
        np.maximum(stats.dim_max, block.max(0), out=stats.dim_max)
        stats.dim_sum += block.sum(0)
        square = np.multiply(block, block, out=squares[:m])
        stats.dim_sumsq += square.sum(0)
        row_sumsq[start:start + m] = square.sum(1)
    return row_sumsq


def _masked_pass(activation: np.ndarray, stats: LayerStats) -> np.ndarray:
    """For arrays holding NaN or inf: counts them and leaves them out; a row with one gets a NaN sum of squares."""
    values = activation.astype(np.float64)
    bad = ~np.isfinite(values)
    stats.dim_non_finite = bad.sum(0).astype(np.int64)
    stats.non_finite = int(stats.dim_non_finite.sum())
    clean = np.where(bad, 0.0, values)
    stats.dim_sum, stats.dim_sumsq = clean.sum(0), (clean * clean).sum(0)
    stats.dim_min = np.where(bad, np.inf, values).min(0)
    stats.dim_max = np.where(bad, -np.inf, values).max(0)
    return np.where(bad.any(1), np.nan, (clean * clean).sum(1))


def _given_reductions(reductions: dict, stats: LayerStats, n: int) -> np.ndarray:
    """Fills the per-dimension fields of `stats` from reductions made beside the capture (model.statistics:
    REDUCTION_FIELDS, `row_sumsq` already reduced to the shard's tokens in order); returns `row_sumsq`."""
    from model.statistics import REDUCTION_FIELDS

    shapes = {name: (n,) if name == "row_sumsq" else (stats.d_model,) for name in REDUCTION_FIELDS}
    missing = sorted(set(shapes) - set(reductions))
    if missing:
        raise ValueError(f"{stats.hook}/{stats.layer}: the device's statistics lack {', '.join(missing)}")
    arrays = {name: np.asarray(reductions[name]) for name in shapes}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{stats.hook}/{stats.layer}: the device's {name} has shape {arrays[name].shape}, "
                             f"expected {shape} (d_model {stats.d_model}, {n} tokens)")
    stats.dim_sum, stats.dim_sumsq = (arrays[k].astype(np.float64) for k in ("dim_sum", "dim_sumsq"))
    stats.dim_min, stats.dim_max = (arrays[k].astype(np.float64) for k in ("dim_min", "dim_max"))
    stats.dim_non_finite = arrays["dim_non_finite"].astype(np.int64)
    stats.non_finite = int(stats.dim_non_finite.sum())
    return arrays["row_sumsq"].astype(np.float64)


def host_reductions(activation: np.ndarray) -> dict[str, np.ndarray]:
    """What model.statistics' reductions hold (REDUCTION_FIELDS, every row a real token), computed by the host's
    pass over an [n, d_model] array: the same numbers (tests/test_device_statistics.py). For benchmarks that stand
    in for the device."""
    activation = np.asarray(activation)
    stats = LayerStats(hook="", layer=0, d_model=activation.shape[1], storage_dtype=str(activation.dtype))
    row_sumsq = _dimension_stats(activation, stats)
    return {"dim_sum": stats.dim_sum, "dim_sumsq": stats.dim_sumsq, "dim_min": stats.dim_min,
            "dim_max": stats.dim_max, "dim_non_finite": stats.dim_non_finite, "row_sumsq": row_sumsq}


def _dimension_stats(activation: np.ndarray, stats: LayerStats) -> np.ndarray:
    """Fills the per-dimension fields of `stats`; returns each row's float64 sum of squares (NaN where the row
    holds a non-finite value)."""
    row_sumsq = _kernel_pass(activation, stats)
    if row_sumsq is None:
        row_sumsq = _numpy_pass(activation, stats)
    # Any NaN or inf reaches the column sums; only then is the slower, masked pass needed.
    if not (np.isfinite(stats.dim_sum).all() and np.isfinite(stats.dim_sumsq).all()):
        row_sumsq = _masked_pass(activation, stats)
    return row_sumsq


def _norm_stats(stats: LayerStats, norms: np.ndarray, finite: np.ndarray) -> None:
    good = norms[finite]
    stats.norm_non_finite = int(norms.size - good.size)
    stats.norm_count = int(good.size)
    if good.size:
        # add.reduce rather than np.dot: a BLAS call wakes OpenBLAS's threads, which then spin on every core.
        stats.norm_sum, stats.norm_sumsq = float(good.sum()), float(np.add.reduce(good * good))
        stats.norm_min, stats.norm_max = float(good.min()), float(good.max())
        stats.histogram = np.bincount(histogram_bin(good), minlength=NUM_BINS).astype(np.int64)


@dataclass(frozen=True)
class TokenColumns:
    """A shard's per-token columns as the statistics use them (PART_CODES, the grid-cell and colour groups' keys
    and members), checked once: every (hook, layer) file of a shard has the same, so the writer makes them once
    per shard (`from_arrow` of its token table)."""
    part: np.ndarray          # int64 PART_CODES
    position: np.ndarray
    token_id: np.ndarray
    sample_index: np.ndarray  # indexes sample_ids
    sample_ids: Sequence[str]
    cells: np.ndarray         # rows of grid-cell tokens (row and col >= 0)
    cell_keys: np.ndarray     # their row * cell_width + col
    cell_width: int
    colored: np.ndarray       # rows of tokens with a colour
    colors: np.ndarray

    @property
    def size(self) -> int:
        return len(self.part)

    @classmethod
    def build(cls, *, part, row, col, color, position, token_id, sample_index, sample_ids,
              where: str = "statistics") -> "TokenColumns":
        """From the columns as arrays (row, col, color -1 off grid cells); a clear error naming `where` for
        columns of different lengths or part codes outside PART_CODES."""
        arrays = {"part": part, "row": row, "col": col, "color": color, "position": position,
                  "token_id": token_id, "sample_index": sample_index}
        n = len(np.asarray(part))
        for name, values in arrays.items():
            if np.shape(values) != (n,):
                raise ValueError(f"{where}: column {name} has shape {np.shape(values)}, expected ({n},)")
        part = np.asarray(part).astype(np.int64)
        if n and (part.min() < 0 or part.max() >= len(PART_NAMES)):
            raise ValueError(f"{where}: part codes must lie in 0..{len(PART_NAMES) - 1}")
        row, col, color = (np.asarray(v).astype(np.int64) for v in (row, col, color))
        cells = np.flatnonzero((row >= 0) & (col >= 0))
        width = int(col[cells].max()) + 1 if cells.size else 1
        colored = np.flatnonzero(color >= 0)
        return cls(part=part, position=np.asarray(position), token_id=np.asarray(token_id),
                   sample_index=np.asarray(sample_index), sample_ids=sample_ids, cells=cells,
                   cell_keys=row[cells] * width + col[cells], cell_width=width, colored=colored,
                   colors=color[colored])

    @classmethod
    def from_arrow(cls, table, where: str = "statistics") -> "TokenColumns":
        """From an activation table or a shard's token table (transforms.write.token_table)."""
        import pyarrow as pa

        table = table.unify_dictionaries()

        def column(name):
            return table.column(name).combine_chunks()

        def numbers(name):
            return column(name).to_numpy(zero_copy_only=False)

        ids = column("sample_id")
        if pa.types.is_dictionary(ids.type):
            sample_index, sample_ids = ids.indices.to_numpy(zero_copy_only=False), ids.dictionary.to_pylist()
        else:
            sample_ids, sample_index = np.unique(np.array(ids.to_pylist(), dtype=str), return_inverse=True)
        part = column("part")
        if pa.types.is_dictionary(part.type):
            lookup = np.array([_part_code(name) for name in part.dictionary.to_pylist()], np.int64)
            part_codes = lookup[part.indices.to_numpy(zero_copy_only=False)]
        else:
            part_codes = np.array([_part_code(name) for name in part.to_pylist()], np.int64)
        return cls.build(part=part_codes, row=numbers("row"), col=numbers("col"), color=numbers("color"),
                         position=numbers("position"), token_id=numbers("token_id"), sample_index=sample_index,
                         sample_ids=sample_ids, where=where)


def compute(activation: np.ndarray, *, hook: str, layer: int, part: np.ndarray | None = None,
            row: np.ndarray | None = None, col: np.ndarray | None = None, color: np.ndarray | None = None,
            position: np.ndarray | None = None, token_id: np.ndarray | None = None,
            sample_index: np.ndarray | None = None, sample_ids: Sequence[str] = (), storage_dtype: str,
            float16_overflow: int = 0, reductions: dict | None = None,
            columns: TokenColumns | None = None) -> LayerStats:
    """Statistics of one shard's [n_tokens, d_model] activations (storage dtype) and its per-token columns,
    given as arrays or as `columns` (TokenColumns, made once per shard).

    sample_index[i] indexes sample_ids for token i (a dictionary column's indices and values). part holds
    PART_CODES; row, col, color are -1 off grid cells. float16_overflow is the writer's count (a stored inf
    cannot tell an overflow from the model's own inf). `reductions`: the per-dimension sums, extrema and counts
    and the per-token sums of squares, made on the device beside the capture (model.statistics); the values
    are then not read here at all."""
    activation = np.asarray(activation)
    if activation.ndim != 2:
        raise ValueError(f"{hook}/{layer}: activation must be [n_tokens, d_model], got shape {activation.shape}")
    n, d = activation.shape
    if columns is None:
        columns = TokenColumns.build(part=part, row=row, col=col, color=color, position=position,
                                     token_id=token_id, sample_index=sample_index, sample_ids=sample_ids,
                                     where=f"{hook}/{layer}")
    if columns.size != n:
        raise ValueError(f"{hook}/{layer}: {columns.size} tokens in the columns, {n} activation rows")
    stats = LayerStats(hook=hook, layer=int(layer), d_model=d, storage_dtype=storage_dtype, shards=1, tokens=n,
                       float16_overflow=int(float16_overflow))
    if not n:
        return stats
    row_sumsq = (_dimension_stats(activation, stats) if reductions is None
                 else _given_reductions(reductions, stats, n))
    norms = np.sqrt(row_sumsq)
    finite = np.isfinite(norms)
    _norm_stats(stats, norms, finite)
    stats.by_part = _group_stats(columns.part, norms, finite, "part")
    if columns.cells.size:
        cells = columns.cells
        stats.by_cell = _group_stats(columns.cell_keys, norms[cells], finite[cells], "cell", columns.cell_width)
    colored = columns.colored
    stats.by_color = _group_stats(columns.colors, norms[colored], finite[colored], "color")
    stats.top = _top_tokens(norms, finite, columns.sample_index, columns.sample_ids, columns.position,
                            columns.token_id, columns.part)
    return stats


def _top_tokens(norms, finite, sample_index, sample_ids, position, token_id, part) -> list[TopToken]:
    candidates = np.flatnonzero(finite)
    if candidates.size > TOP_K:
        # Every token tied with the k-th largest norm stays a candidate, so the tie-break below decides.
        threshold = np.partition(norms[candidates], candidates.size - TOP_K)[candidates.size - TOP_K]
        candidates = candidates[norms[candidates] >= threshold]
    top = [TopToken(float(norms[i]), str(sample_ids[int(sample_index[i])]), int(position[i]), int(token_id[i]),
                    PART_NAMES[int(part[i])]) for i in candidates]
    return sorted(top, key=TopToken.key)[:TOP_K]


def from_arrow(table, hook: str, layer: int, storage_dtype: str, float16_overflow: int = 0,
               activation: np.ndarray | None = None, reductions: dict | None = None,
               columns: TokenColumns | None = None) -> LayerStats:
    """Statistics of an activation table (the writer's, or a file read back). `activation` may pass the decoded
    [rows, d_model] array when the caller already has it; `reductions` the device's (see `compute`); `columns`
    the shard's TokenColumns when the caller has them."""
    if activation is None:
        from transforms.output_format import activations_to_numpy

        activation = activations_to_numpy(table)
    if columns is None:
        columns = TokenColumns.from_arrow(table, where=f"{hook}/{layer}")
    return compute(activation, hook=hook, layer=layer, storage_dtype=storage_dtype,
                   float16_overflow=float16_overflow, reductions=reductions, columns=columns)


def _part_code(name) -> int:
    if name not in PART_NAMES:
        raise ValueError(f"part {name!r} is not one of {', '.join(PART_NAMES)}")
    return PART_NAMES.index(name)


# ------------------------------------------------------------------------------------------ stats documents

def merge_all(items: Iterable[LayerStats]) -> dict[tuple[str, int], LayerStats]:
    """(hook, layer) -> merged statistics, folded in the given order (pass a sorted order for a deterministic
    result: float64 sums then come out bit for bit the same on every run)."""
    merged: dict[tuple[str, int], LayerStats] = {}
    for item in items:
        merged[item.key] = merged[item.key].merge(item) if item.key in merged else item
    return merged


def document(stats: Iterable[LayerStats], **extra) -> dict[str, Any]:
    """The JSON document of a stats file (per shard or merged): schema, histogram bins, one record per layer."""
    records = sorted(stats, key=lambda s: (s.hook, s.layer))
    return {"schema_version": SCHEMA_VERSION, "top_k": TOP_K, "histogram": HISTOGRAM_SPEC, **extra,
            "layers": [s.to_json() for s in records]}


_JSON_NULL = re.compile(rb"[:,\[]null[,\]}]")  # a null value, not "null" inside a string (base64 holds some)


def dumps(doc: dict[str, Any]) -> bytes:
    """Strict JSON, keys sorted, no spaces. Through orjson: with the json module, a shard's stats file was the
    largest part of what the statistics cost the writer (docs/benchmarks.md)."""
    data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    if b"null" in data and _JSON_NULL.search(data):
        # orjson writes a float NaN or infinity as null; the json module refuses them (every float here passes
        # through _float first, so that would be a bug) and writes a None as null too. A string that looks like
        # a null value only takes this slower path.
        return json.dumps(doc, sort_keys=True, allow_nan=False, ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
    return data


def loads(data: bytes | str, where: str = "statistics file") -> tuple[dict[str, Any], list[LayerStats]]:
    """(the document without its layers, the layer statistics); a clear error naming `where` otherwise."""
    try:
        doc = orjson.loads(data)
    except ValueError as error:  # orjson.JSONDecodeError is one
        raise ValueError(f"{where}: not JSON ({error})") from error
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version {doc.get('schema_version') if isinstance(doc, dict) else None!r}"
                         f", expected {SCHEMA_VERSION}; recompute it with python -m pipeline.stats OUTPUT --write")
    if doc.get("histogram") != HISTOGRAM_SPEC or doc.get("top_k") != TOP_K:
        raise ValueError(f"{where}: histogram bins {doc.get('histogram')} / top_k {doc.get('top_k')} differ from "
                         f"this version's ({HISTOGRAM_SPEC}, {TOP_K}); histograms of different bins do not add")
    layers = [LayerStats.from_json(record, f"{where} layer record {i}") for i, record in enumerate(doc["layers"])]
    return {k: v for k, v in doc.items() if k != "layers"}, layers


# ---------------------------------------------------------------------------------------------- shard files

KIND = "stats"
# Key of the commit marker's metadata that lists the shard's stats file. Its own key, not an entry of `files`:
# every reader of `files` takes its entries for activation files (hook, layer, rows).
MARKER_KEY = "stats"


def shard_relpath(shard: str) -> str:
    return f"{STATS_DIR}/{shard}.json"


def shard_file(shard: str, stats: Sequence[LayerStats]) -> tuple[bytes, dict[str, Any]]:
    """The bytes of stats/<shard>.json and its entry for the commit marker ({path, kind, layers, bytes, sha256})."""
    import hashlib

    data = dumps(document(stats, shard=shard))
    entry = {"path": shard_relpath(shard), "kind": KIND, "layers": len(stats), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
    return data, entry


def marker_entry(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The stats-file entry of a commit marker's (decoded) metadata; None for shards written without one."""
    from transforms.output_format import marker_file_entry

    return marker_file_entry(metadata, MARKER_KEY, frozenset({"path", "bytes", "sha256"}))
