"""Packing a step's metrics into one buffer per dtype group: the machinery behind
:class:`penwatch.schema.Metrics` (value classification, the static structure, the
builder that concatenates values and columns)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_ALLOWED_VALUE = (
    "a real or boolean scalar (Python number, NumPy or JAX 0-d array) or an array "
    "with at least one dimension; keys starting with '_' (reserved) may hold any pytree"
)
_FLOAT, _BOOL, _INT = "float", "bool", "int"
_GROUPS = (_FLOAT, _BOOL, _INT)


def _show(value: Any) -> str:
    """A value as an error message shows it."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced value of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (np.ndarray, jax.Array)):
        if np.ndim(value) == 0:
            return f"{np.asarray(value).item()!r} (dtype {value.dtype})"
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _group_of(dtype: Any) -> str | None:
    if jnp.issubdtype(dtype, jnp.bool_):
        return _BOOL
    if jnp.issubdtype(dtype, jnp.floating):
        return _FLOAT
    if jnp.issubdtype(dtype, jnp.integer):
        return _INT
    return None


def _classify(where: str, key: str, value: Any) -> tuple[str | None, np.dtype | None]:
    """``(group, dtype)`` of a value; group None: kept unpacked (a non-scalar array).

    ``dtype`` is the canonical dtype the value reads back in; None for Python scalars,
    which take their group's dtype (like JAX's weak types).
    """
    if isinstance(value, bool):
        return _BOOL, None
    if isinstance(value, int):
        return _INT, None
    if isinstance(value, float):
        return _FLOAT, None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if value.shape != ():
            return None, None
        dtype = jax.dtypes.canonicalize_dtype(value.dtype)
        group = _group_of(dtype)
        if group is not None:
            return group, dtype
    raise TypeError(
        f"{where}: argument 'values' entry {key!r} must be {_ALLOWED_VALUE}, got {_show(value)}"
    )


def _group_dtype(group: str, dtypes: Sequence[np.dtype]) -> np.dtype:
    wide = any(d.itemsize == 8 for d in dtypes)
    if group == _FLOAT:
        return jax.dtypes.canonicalize_dtype(np.float64 if wide else np.float32)
    if group == _INT:
        wide = wide or any(d == np.uint32 for d in dtypes)
        return jax.dtypes.canonicalize_dtype(np.int64 if wide else np.int32)
    return np.dtype(np.bool_)


def _check_penalties(where: str, penalties: Any) -> tuple[str, ...]:
    if isinstance(penalties, str) or not isinstance(penalties, Sequence):
        raise TypeError(
            f"{where}: option 'penalties' must be a sequence of penalty names, "
            f"got {_show(penalties)}"
        )
    for name in penalties:
        if not isinstance(name, str):
            raise TypeError(f"{where}: option 'penalties' must hold strings, got {_show(name)}")
    return tuple(penalties)


class _Structure:
    """The static half of a :class:`Metrics` (its pytree aux data): hashable, interned.

    Attributes:
      keys: every key, in order.
      slots: per key ``(group, position)``: a buffer index and the position in it, or
        ``(-1, i)`` for the i-th unpacked child.
      groups: the dtype of each packed buffer (float, bool, int groups, those present).
      dtypes: per key the dtype ``m[key]`` reads back in (None: the buffer's own).
      penalties: penalty names in pipeline order.
    """

    __slots__ = (
        "_getters",
        "_hash",
        "dtypes",
        "groups",
        "index",
        "keys",
        "penalties",
        "reserved_keys",
        "scalar_keys",
        "scalar_slots",
        "slots",
        "unpacked_keys",
    )

    def __init__(
        self,
        keys: tuple[str, ...],
        slots: tuple[tuple[int, int], ...],
        groups: tuple[np.dtype, ...],
        dtypes: tuple[np.dtype | None, ...],
        penalties: tuple[str, ...],
    ) -> None:
        self.keys, self.slots, self.groups = keys, slots, groups
        self.dtypes, self.penalties = dtypes, penalties
        self.index = {k: i for i, k in enumerate(keys)}
        packed = [(k, g, p) for k, (g, p) in zip(keys, slots, strict=True) if g >= 0]
        self.scalar_slots = tuple(packed)
        self.scalar_keys = tuple(k for k, _, _ in packed)
        self.unpacked_keys = tuple(k for k, (g, _) in zip(keys, slots, strict=True) if g < 0)
        self.reserved_keys = tuple(k for k in self.unpacked_keys if k.startswith("_"))
        self._getters: dict[tuple[int, ...], Any] = {}
        self._hash = hash(self._fields())

    def scalar_getter(self, sizes: tuple[int, ...]) -> Any:
        """A function from the buffers' values laid end to end (a list; buffers of
        ``sizes`` entries) to the packed values in key order, as a tuple (cached)."""
        getter = self._getters.get(sizes)
        if getter is None:
            offsets = np.cumsum((0, *sizes))
            flat = [int(offsets[g] + p) for _, g, p in self.scalar_slots]
            if len(flat) == 1:
                getter = lambda values, i=flat[0]: (values[i],)  # noqa: E731
            else:
                getter = operator.itemgetter(*flat) if flat else lambda values: ()
            self._getters[sizes] = getter
        return getter

    def _fields(self) -> tuple[Any, ...]:
        return (self.keys, self.slots, self.groups, self.dtypes, self.penalties)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, _Structure):
            return NotImplemented
        return self._hash == other._hash and self._fields() == other._fields()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_structure, self._fields())

    def __repr__(self) -> str:
        return f"_Structure(keys={self.keys}, penalties={self.penalties})"


@functools.lru_cache(maxsize=1024)
def _structure(*fields: Any) -> _Structure:
    return _Structure(*fields)


class _Piece(NamedTuple):
    """A run of positions in a group's buffer: stacked scalars or one column array."""

    stacked: bool
    arrays: tuple[int, ...]  # indices into the builder's arrays
    dtypes: list[np.dtype | None]  # per position: the dtype it reads back in


def _assemble(arrays: tuple[Any, ...], spec: tuple[Any, ...]) -> tuple[Any, ...]:
    """The buffers: per group ``(dtype, pieces)``, each piece ``(stacked, indices)``."""
    buffers = []
    for dtype, pieces in spec:
        parts = [
            jnp.stack([jnp.asarray(arrays[i], dtype) for i in idx], axis=-1)
            if stacked
            else jnp.asarray(arrays[idx[0]], dtype)
            for stacked, idx in pieces
        ]
        buffers.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1))
    return tuple(buffers)


_assemble_jit = jax.jit(_assemble, static_argnums=1)


def _take(buf: Any, position: int, dtype: np.dtype | None) -> Any:
    value = buf[..., position]
    return value if dtype is None else value.astype(dtype)


_take_jit = jax.jit(_take, static_argnums=(1, 2))


class _Builder:
    """Collects entries (a later entry for a key replaces it, in place) and packs them."""

    def __init__(self) -> None:
        self.arrays: list[Any] = []
        self.pieces: dict[str, list[_Piece]] = {g: [] for g in _GROUPS}
        self.entries: dict[str, tuple[str, int, int] | tuple[None, Any, None]] = {}

    def scalars(self, where: str, values: Mapping[str, Any]) -> None:
        stacks: dict[str, tuple[list[int], list[np.dtype | None], list[str]]] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: argument 'values' keys must be strings, got {key!r}")
            group, dtype = (None, None) if key.startswith("_") else _classify(where, key, value)
            if group is None:
                self.entries[key] = (None, value, None)
                continue
            self.entries[key] = (group, -1, -1)  # its place in the order; set by _add
            indices, dtypes, keys = stacks.setdefault(group, ([], [], []))
            indices.append(len(self.arrays))
            dtypes.append(dtype)
            keys.append(key)
            self.arrays.append(value)
        for group, (indices, dtypes, keys) in stacks.items():
            self._add(group, _Piece(True, tuple(indices), dtypes), keys)

    def column(self, group: str, array: Any, dtypes: list[np.dtype | None], keys: list) -> None:
        self.arrays.append(array)
        self._add(group, _Piece(False, (len(self.arrays) - 1,), dtypes), keys)

    def _add(self, group: str, piece: _Piece, keys: Sequence[str | None]) -> None:
        pieces = self.pieces[group]
        for position, key in enumerate(keys):
            if key is not None:
                self.entries[key] = (group, len(pieces), position)
        pieces.append(piece)

    def build(self, penalties: tuple[str, ...]) -> tuple[_Structure, tuple[Any, ...], list[Any]]:
        """``(structure, buffers, unpacked values)`` of a Metrics."""
        present = [g for g in _GROUPS if self.pieces[g]]
        group_dtype = {
            g: _group_dtype(g, [d for p in self.pieces[g] for d in p.dtypes if d is not None])
            for g in present
        }
        offsets = {g: np.cumsum([0] + [len(p.dtypes) for p in self.pieces[g]]) for g in present}
        slots, dtypes, unpacked = [], [], []
        for group, a, b in self.entries.values():
            if group is None:
                slots.append((-1, len(unpacked)))
                unpacked.append(a)
                dtypes.append(None)
            else:
                dtype = self.pieces[group][a].dtypes[b]
                slots.append((present.index(group), int(offsets[group][a]) + b))
                dtypes.append(None if dtype in (None, group_dtype[group]) else dtype)
        spec = tuple(
            (group_dtype[g], tuple((p.stacked, p.arrays) for p in self.pieces[g])) for g in present
        )
        arrays = tuple(self.arrays)
        if not spec:
            buffers: tuple[Any, ...] = ()
        elif any(isinstance(a, jax.core.Tracer) for a in arrays):
            buffers = _assemble(arrays, spec)
        else:
            buffers = _assemble_jit(arrays, spec)  # concrete values: one dispatch
        structure = _structure(
            tuple(self.entries),
            tuple(slots),
            tuple(group_dtype[g] for g in present),
            tuple(dtypes),
            penalties,
        )
        return structure, buffers, unpacked
