"""``pw.Metrics``: a step's metrics, packed on the device (SPEC section 10).

A jitted function that returns one device buffer per scalar metric pays for every
buffer: a 32-penalty ``compute`` made 160 scalar outputs and cost 3.9-10x its
``compute_total`` on XLA:CPU. :class:`Metrics` is an immutable
``Mapping[str, jax.Array]`` registered as a pytree whose keys are static structure and
whose scalar values live in **one buffer per dtype group**:

* floating values -> ``float32`` (exact for ``float16``/``bfloat16``; ``float64`` when
  x64 is on and a value is ``float64``);
* booleans (``P_finite`` flags) -> ``bool``;
* integers (counts) -> ``int32`` (``int64`` when x64 is on and a value is 64-bit).

Reserved keys (starting with ``_``, e.g. ``"_leaf_nonfinite"``) and non-scalar values
(e.g. the ``pairwise_cosine`` matrix) are kept as they are, as pytree children of their
own. ``m[key]`` slices its buffer (``buf[..., i]``, so ``vmap``-ed and ``scan``-stacked
buffers work) and gives the value back in the dtype it was packed from;
:meth:`Metrics.scalars` reads every packed value to the host with one transfer per
buffer.

Build one with :meth:`Metrics.pack` (a mapping of scalars), :meth:`Metrics.from_columns`
(vectors of values, e.g. every penalty's value at once: one concatenation instead of one
stacking op per scalar, which XLA:CPU runs as one small kernel each) and
:meth:`Metrics.merge` (reuses the buffers of the metrics merged).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self

import jax
import numpy as np

from penwatch.schema._host import host_rows
from penwatch.schema._packing import (
    _Builder,
    _check_penalties,
    _group_of,
    _show,
    _Structure,
    _take,
    _take_jit,
)

__all__ = ["Metrics"]


@jax.tree_util.register_pytree_with_keys_class
class Metrics(Mapping[str, jax.Array]):
    """A step's metrics: an immutable mapping, packed on the device, a JAX pytree.

    What ``Pipeline.compute``, ``MultiPipeline.compute`` and penwatch train steps
    return. Keys (and the penalty order) are static structure; scalar values live in one
    buffer per dtype group (see the module docstring). Keys iterate in the order they
    were given in (for penwatch's metrics: computation order, penalties in pipeline
    order); :attr:`penalties` carries the pipeline order explicitly.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import penwatch as pw
      >>> m = pw.Metrics.pack({"l1": jnp.float32(0.5), "l1_finite": True}, penalties=["l1"])
      >>> float(m["l1"]), len(m.buffers), m.scalar_keys
      (0.5, 2, ('l1', 'l1_finite'))
      >>> m.scalars()
      {'l1': 0.5, 'l1_finite': 1.0}
      >>> host = jax.device_get(m)   # a Metrics of NumPy buffers
      >>> float(host["l1"])
      0.5

    ``dict(m)`` gives a mutable copy; :meth:`merge` adds or replaces keys; item
    assignment raises ``TypeError``.
    """

    __slots__ = ("_buffers", "_structure", "_unpacked")

    _structure: _Structure
    _buffers: tuple[Any, ...]
    _unpacked: tuple[Any, ...]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "penwatch.Metrics: build one with Metrics.pack(values, penalties=...) or "
            "Metrics.from_columns(columns, penalties=...)"
        )

    @classmethod
    def _make(cls, structure: _Structure, buffers: Any, unpacked: Any) -> Self:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_structure", structure)
        object.__setattr__(obj, "_buffers", tuple(buffers))
        object.__setattr__(obj, "_unpacked", tuple(unpacked))
        return obj

    @classmethod
    def pack(cls, values: Mapping[str, Any], *, penalties: Sequence[str] = ()) -> Self:
        """Pack a mapping of metrics, one buffer per dtype group (in or outside ``jit``).

        Args:
          values: ``{key: value}``; scalars (Python numbers, 0-d NumPy/JAX arrays,
            traced or not) are packed, arrays with at least one dimension and every
            value under a reserved key (``_``-prefixed, any pytree) are kept as they are.
            The keys of the result are in the insertion order of ``values``.
          penalties: the penalty names in pipeline order (static data).

        Raises:
          TypeError: ``values`` is not a mapping, a key is not a string, a value is not
            an array or a number (outside reserved keys), or ``penalties`` is not a
            sequence of strings.

        Example:
          >>> import jax.numpy as jnp
          >>> m = Metrics.pack({"total": jnp.float32(1.5), "pairwise_cosine": jnp.eye(2)})
          >>> m.scalar_keys, m["pairwise_cosine"].shape
          (('total',), (2, 2))
        """
        where = "penwatch.Metrics.pack"
        if not isinstance(values, Mapping):
            raise TypeError(
                f"{where}: argument 'values' must be a mapping of string keys to metric "
                f"values, got {_show(values)}"
            )
        penalties = _check_penalties(where, penalties)
        builder = _Builder()
        builder.scalars(where, values)
        return cls._make(*builder.build(penalties))

    @classmethod
    def from_columns(
        cls,
        columns: Sequence[tuple[Sequence[str], Any]],
        *,
        order: Sequence[str] | None = None,
        penalties: Sequence[str] = (),
    ) -> Self:
        """Metrics from vectors: ``(keys, array)`` pairs, ``array[..., i]`` for ``keys[i]``.

        The vectorized twin of :meth:`pack`: a column goes into its group's buffer in one
        piece, so a pipeline computing every penalty's value, weighted value and weight
        as vectors packs them with one concatenation (``pack`` of their elements would
        slice and re-stack each one: one small kernel per metric on XLA:CPU).

        Args:
          columns: ``(keys, array)`` pairs; ``array`` is a real or boolean array whose
            last axis has ``len(keys)`` entries. A key may appear in one column only.
          order: the key order of the result (a permutation of all keys); default: the
            columns' keys in turn.
          penalties: the penalty names in pipeline order (static data).

        Raises:
          TypeError: a column is not a ``(keys, array)`` pair of string keys and a real
            or boolean array.
          ValueError: a column's length differs from its number of keys, a key repeats,
            or ``order`` is not a permutation of the keys.

        Example:
          >>> import jax.numpy as jnp
          >>> v = jnp.array([0.5, 2.0])
          >>> m = Metrics.from_columns([(["l1", "l2"], v), (["l1_finite", "l2_finite"],
          ...                           jnp.isfinite(v))], order=["l1", "l1_finite", "l2",
          ...                           "l2_finite"], penalties=["l1", "l2"])
          >>> list(m), float(m["l2"]), len(m.buffers)
          (['l1', 'l1_finite', 'l2', 'l2_finite'], 2.0, 2)
        """
        where = "penwatch.Metrics.from_columns"
        penalties = _check_penalties(where, penalties)
        builder = _Builder()
        for column in columns:
            if not (isinstance(column, tuple | list) and len(column) == 2):
                raise TypeError(
                    f"{where}: argument 'columns' must hold (keys, array) pairs, "
                    f"got {_show(column)}"
                )
            keys, array = list(column[0]), column[1]
            bad = [k for k in keys if not isinstance(k, str) or k.startswith("_")]
            group = _group_of(getattr(array, "dtype", object))
            if bad or not isinstance(array, (jax.Array, np.ndarray)) or group is None:
                raise TypeError(
                    f"{where}: argument 'columns' must hold (keys, array) pairs of metric "
                    "names (strings not starting with '_') and a real or boolean array, "
                    f"got keys {keys} and {_show(array)}"
                )
            if np.ndim(array) == 0 or array.shape[-1] != len(keys):
                raise ValueError(
                    f"{where}: column {keys} must have {len(keys)} entries along its last "
                    f"axis, got {_show(array)}"
                )
            repeated = [k for k in keys if k in builder.entries or keys.count(k) > 1]
            if repeated:
                raise ValueError(f"{where}: keys {sorted(set(repeated))} appear more than once")
            dtype = jax.dtypes.canonicalize_dtype(array.dtype)
            builder.column(group, array, [dtype] * len(keys), keys)
        if order is not None:
            order = list(order)
            if sorted(order) != sorted(builder.entries):
                raise ValueError(
                    f"{where}: option 'order' must be a permutation of the columns' keys "
                    f"{list(builder.entries)}, got {order}"
                )
            builder.entries = {k: builder.entries[k] for k in order}
        return cls._make(*builder.build(penalties))

    def merge(self, *others: Mapping[str, Any], penalties: Sequence[str] | None = None) -> Self:
        """These metrics with ``others``' entries added (at the end) or replacing (in place).

        The buffers of these metrics and of ``others`` that are :class:`Metrics` are
        reused whole (one concatenation per dtype group); plain mappings are packed as
        by :meth:`pack`. A replaced value stays in its buffer, unread.

        Args:
          *others: mappings or :class:`Metrics`, applied in turn.
          penalties: the penalty order of the result; default: these penalties, then
            those of ``others`` that are :class:`Metrics`, each name once.

        Example:
          >>> import jax.numpy as jnp
          >>> m = Metrics.pack({"total": jnp.float32(1.0)})
          >>> m = m.merge({"loss": jnp.float32(2.0), "total": jnp.float32(3.0)})
          >>> list(m), float(m["total"])
          (['total', 'loss'], 3.0)
        """
        where = "penwatch.Metrics.merge"
        builder = _Builder()
        names = list(self.penalties)
        for part in (self, *others):
            if isinstance(part, Metrics):
                part._into(builder)
                names += [p for p in part.penalties if p not in names]
            elif isinstance(part, Mapping):
                builder.scalars(where, part)
            else:
                raise TypeError(f"{where}: arguments must be mappings, got {_show(part)}")
        names = names if penalties is None else _check_penalties(where, penalties)
        return type(self)._make(*builder.build(tuple(names)))

    def _into(self, builder: _Builder) -> None:
        s = self._structure
        layout: dict[int, list[tuple[str | None, np.dtype]]] = {
            g: [(None, d)] * b.shape[-1]
            for g, (d, b) in enumerate(zip(s.groups, self._buffers, strict=True))
        }
        for key, (group, position), dtype in zip(s.keys, s.slots, s.dtypes, strict=True):
            if group < 0:
                builder.entries[key] = (None, self._unpacked[position], None)
            else:
                builder.entries[key] = (None, None, None)  # its place in the order
                layout[group][position] = (key, s.groups[group] if dtype is None else dtype)
        for g, buffer in enumerate(self._buffers):
            keys = [k for k, _ in layout[g]]
            dtypes = [d for _, d in layout[g]]
            builder.column(_group_of(s.groups[g]), buffer, dtypes, keys)  # type: ignore[arg-type]

    # --- pytree protocol: buffers and unpacked values are children, keys are aux ---

    def tree_flatten(self) -> tuple[tuple[Any, ...], _Structure]:
        return (*self._buffers, *self._unpacked), self._structure

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], _Structure]:
        s = self._structure
        children = [
            (jax.tree_util.GetAttrKey(f"buffers[{i}]"), b) for i, b in enumerate(self._buffers)
        ]
        children += [
            (jax.tree_util.DictKey(k), v)
            for k, v in zip(s.unpacked_keys, self._unpacked, strict=True)
        ]
        return children, s

    @classmethod
    def tree_unflatten(cls, structure: _Structure, children: Any) -> Self:
        children = tuple(children)
        n = len(structure.groups)
        return cls._make(structure, children[:n], children[n:])

    def __reduce__(self) -> tuple[Any, ...]:
        return (Metrics._make, (self._structure, self._buffers, self._unpacked))

    # --- immutability ---------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("penwatch.Metrics is immutable; use dict(m) or m.merge({...})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("penwatch.Metrics is immutable")

    # --- the mapping ------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        s = self._structure
        i = s.index.get(key) if isinstance(key, str) else None
        if i is None:
            raise KeyError(key)
        group, position = s.slots[i]
        if group < 0:
            return self._unpacked[position]
        buf = self._buffers[group]
        if isinstance(buf, jax.Array) and not isinstance(buf, jax.core.Tracer):
            return _take_jit(buf, position, s.dtypes[i])  # one small dispatch
        return _take(buf, position, s.dtypes[i])

    def __iter__(self) -> Iterator[str]:
        return iter(self._structure.keys)

    def __len__(self) -> int:
        return len(self._structure.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._structure.index

    # --- packed views -----------------------------------------------------------------

    @property
    def penalties(self) -> tuple[str, ...]:
        """Penalty names in pipeline order (static; ``()`` when not given)."""
        return self._structure.penalties

    @property
    def scalar_keys(self) -> tuple[str, ...]:
        """The packed keys, in key order."""
        return self._structure.scalar_keys

    @property
    def buffers(self) -> tuple[Any, ...]:
        """The packed buffers, one per dtype group present (float, bool, int order)."""
        return self._buffers

    @property
    def unpacked_keys(self) -> tuple[str, ...]:
        """The keys held unpacked (reserved entries and non-scalar arrays), in key order."""
        return self._structure.unpacked_keys

    @property
    def unpacked(self) -> tuple[Any, ...]:
        """The unpacked values, in :attr:`unpacked_keys` order."""
        return self._unpacked

    @property
    def packed_only(self) -> bool:
        """True when every entry is a packed scalar (no reserved entries, no arrays):
        :attr:`buffers` then hold all of it."""
        return not self._unpacked

    @property
    def reserved(self) -> Mapping[str, Any]:
        """The reserved (``_``-prefixed, not metric) entries, unpacked, in key order."""
        s = self._structure
        by_key = dict(zip(s.unpacked_keys, self._unpacked, strict=True))
        return {k: by_key[k] for k in s.reserved_keys}

    @property
    def arrays(self) -> Mapping[str, Any]:
        """The non-scalar metric entries (e.g. ``pairwise_cosine``), unpacked."""
        s = self._structure
        return {
            k: v
            for k, v in zip(s.unpacked_keys, self._unpacked, strict=True)
            if not k.startswith("_")
        }

    def scalars(self) -> dict[str, float]:
        """Every packed value as a Python float, in key order (bools give 0.0/1.0).

        Reads each buffer once (one host copy per buffer, waiting for the device; see
        :meth:`scalar_rows`); reserved and non-scalar entries are left out. Buffers may
        be JAX or NumPy arrays, unbatched.

        Raises:
          TypeError: called on traced buffers (inside ``jit``).
          ValueError: the buffers are batched (from ``vmap`` or stacking).
        """
        (row,) = Metrics.scalar_rows([self])
        return dict(zip(self._structure.scalar_keys, row, strict=True))

    @classmethod
    def scalar_rows(cls, many: Sequence[Metrics]) -> list[tuple[float, ...]]:
        """The packed values of many ``Metrics`` of one structure, one tuple per item.

        Each tuple equals ``tuple(m.scalars().values())`` (key order, Python floats),
        but the buffers of all items are converted together: one host copy per buffer,
        then one NumPy conversion per dtype group for the whole batch. For the monitor's
        dispatcher, which reads every recorded step this way.

        Raises:
          ValueError: the items do not share one structure (keys, dtypes, penalties), or a
            buffer is batched.
          TypeError: a buffer is traced (inside ``jit``).
          RuntimeError: a buffer was deleted or donated.
        """
        if not many:
            return []
        structure = many[0]._structure
        if any(m._structure != structure for m in many):
            raise ValueError("penwatch.Metrics.scalar_rows: the items differ in structure")
        blocks = []
        for group in range(len(many[0]._buffers)):
            buffers = [m._buffers[group] for m in many]
            if any(isinstance(buf, jax.core.Tracer) for buf in buffers):
                raise TypeError(
                    "penwatch.Metrics: the buffers are traced (inside jit/vmap/grad); "
                    "read the values on the host, from the returned metrics"
                )
            block = host_rows(buffers)
            if block.ndim != 2:
                raise ValueError(
                    "penwatch.Metrics: needs unbatched buffers (one value per key), got "
                    f"a buffer of shape {block.shape[1:]}; index the batch first"
                )
            blocks.append(block)
        if not blocks:  # only reserved or non-scalar entries
            return [() for _ in many]
        sizes = tuple(b.shape[1] for b in blocks)
        getter = structure.scalar_getter(sizes)
        # float16/32/64 convert to Python floats exactly; bool, int and bfloat16 through
        # float64, as scalars() does
        if len(blocks) == 1 and blocks[0].dtype.kind == "f":
            flat = blocks[0].tolist()
        else:
            flat = np.concatenate([b.astype(np.float64) for b in blocks], axis=1).tolist()
        return [getter(row) for row in flat]

    def __repr__(self) -> str:
        s = self._structure
        concrete = all(
            isinstance(b, (jax.Array, np.ndarray))
            and not isinstance(b, jax.core.Tracer)
            and np.ndim(b) == 1
            for b in self._buffers
        )
        if not concrete:
            shapes = ", ".join(
                f"{getattr(b, 'dtype', '?')}{list(getattr(b, 'shape', ()))}" for b in self._buffers
            )
            return (
                f"Metrics(keys={list(s.keys)}, buffers=[{shapes}], penalties={list(s.penalties)})"
            )
        values = self.scalars()
        parts = []
        for key, (group, _) in zip(s.keys, s.slots, strict=True):
            if group >= 0:
                number = values[key]
                text = repr(bool(number)) if s.groups[group] == np.bool_ else f"{number:.6g}"
            else:
                shape = getattr(self[key], "shape", None)
                text = "<reserved>" if shape is None else f"<array {tuple(shape)}>"
            parts.append(f"{key!r}: {text}")
        return f"Metrics({{{', '.join(parts)}}}, penalties={list(s.penalties)})"
