"""``LeafCounts``: per-leaf NaN/Inf counts of a pytree, as one array (SPEC section 6).

A train step's non-finite report needs, for every parameter and gradient leaf, how many
of its values are NaN and how many Inf. As a dict of scalar pairs that is two device
buffers per leaf, each produced by the step, moved and freed on every step (freeing 24
small buffers cost the monitor more than the rest of a record). :class:`LeafCounts`
keeps the paths as static pytree structure and the counts as one ``int32[n, 2]`` array,
while reading like the mapping ``{path: (nan_count, inf_count)}`` it replaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LeafCounts"]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class LeafCounts(Mapping[str, tuple[Any, Any]]):
    """``{path: (nan_count, inf_count)}`` backed by one ``[n, 2]`` integer array.

    Attributes:
      paths: leaf paths (``jax.tree_util.keystr``), static.
      counts: ``int32[len(paths), 2]`` (device or host array): NaN and Inf counts.

    Example:
      >>> import jax.numpy as jnp
      >>> c = LeafCounts.pack({"['w']": (jnp.int32(1), jnp.int32(0))})
      >>> [int(v) for v in c["['w']"]]
      [1, 0]
    """

    paths: tuple[str, ...]
    counts: Any

    @classmethod
    def pack(cls, counts: Mapping[str, tuple[Any, Any]]) -> LeafCounts:
        """From ``{path: (nan_count, inf_count)}`` scalars (inside or outside ``jit``)."""
        paths = tuple(counts)
        if not paths:
            return cls((), jnp.zeros((0, 2), jnp.int32))
        pairs = [
            jnp.stack([jnp.asarray(n, jnp.int32), jnp.asarray(i, jnp.int32)])
            for n, i in counts.values()
        ]
        return cls(paths, jnp.stack(pairs))

    def tree_flatten(self) -> tuple[tuple[Any], tuple[str, ...]]:
        return (self.counts,), self.paths

    @classmethod
    def tree_unflatten(cls, paths: tuple[str, ...], children: tuple[Any, ...]) -> LeafCounts:
        return cls(paths, children[0])

    def __getitem__(self, path: str) -> tuple[Any, Any]:
        i = self.paths.index(path)
        return self.counts[i, 0], self.counts[i, 1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self) -> list[tuple[str, int, int]]:
        """``(path, nan_count, inf_count)`` for every leaf, read with one host copy."""
        table = np.asarray(self.counts).tolist()
        return [(p, int(n), int(i)) for p, (n, i) in zip(self.paths, table, strict=True)]
