"""Per-leaf NaN/Inf counts of pytrees, as one array (SPEC section 6).

A train step's non-finite report needs, for every parameter and gradient leaf, how many
of its values are NaN and how many Inf. As a dict of scalar pairs that is two device
buffers per leaf, each produced by the step, moved and freed on every step (freeing 24
small buffers cost the monitor more than the rest of a record). :class:`LeafCounts`
keeps one tree's paths as static pytree structure and its counts as one ``int32[n, 2]``
array, while reading like the mapping ``{path: (nan_count, inf_count)}`` it replaces;
:class:`TreeLeafCounts` does the same for several trees (a train step's parameters and
gradients) with one array for all of them, reading like ``{tree: LeafCounts}``.

One array per step matters to the monitor: it reads every step's counts (one host copy
each, by address) and frees them, and each further device buffer per step costs the
dispatcher a deletion and, while it waits for its batch, keeps more objects alive for
the garbage collector. Two trees' arrays and their in-step total (three buffers, a dict
and two ``LeafCounts``) cost the dispatcher ~66 against ~38 µs per step next to a
~1.5 ms step, without sinks (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LeafCounts", "TreeLeafCounts"]


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


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class TreeLeafCounts(Mapping[str, LeafCounts]):
    """``{tree: {path: (nan_count, inf_count)}}`` backed by one ``[n, 2]`` integer array.

    The rows of every tree in turn, in the order the trees were given; ``counts[a:b]`` of
    tree ``t`` is its :class:`LeafCounts`.

    Attributes:
      trees: ``(tree name, leaf paths)`` pairs, static.
      counts: ``int32[total leaves, 2]`` (device or host array): NaN and Inf counts.

    Example:
      >>> import jax.numpy as jnp
      >>> c = TreeLeafCounts.pack({"params": {"['w']": (jnp.int32(0), jnp.int32(2))},
      ...                          "grads": {"['w']": (jnp.int32(1), jnp.int32(0))}})
      >>> list(c), [int(v) for v in c["grads"]["['w']"]], c.counts.shape
      (['params', 'grads'], [1, 0], (2, 2))
    """

    trees: tuple[tuple[str, tuple[str, ...]], ...]
    counts: Any

    @classmethod
    def pack(cls, trees: Mapping[str, Mapping[str, tuple[Any, Any]]]) -> TreeLeafCounts:
        """From ``{tree: {path: (nan_count, inf_count)}}`` scalars (inside or outside
        ``jit``)."""
        static = tuple((name, tuple(counts)) for name, counts in trees.items())
        pairs = [
            jnp.stack([jnp.asarray(n, jnp.int32), jnp.asarray(i, jnp.int32)])
            for counts in trees.values()
            for n, i in counts.values()
        ]
        return cls(static, jnp.stack(pairs) if pairs else jnp.zeros((0, 2), jnp.int32))

    def tree_flatten(self) -> tuple[tuple[Any], tuple[tuple[str, tuple[str, ...]], ...]]:
        return (self.counts,), self.trees

    @classmethod
    def tree_unflatten(
        cls, trees: tuple[tuple[str, tuple[str, ...]], ...], children: tuple[Any, ...]
    ) -> TreeLeafCounts:
        return cls(trees, children[0])

    def __getitem__(self, tree: str) -> LeafCounts:
        start = 0
        for name, paths in self.trees:
            if name == tree:
                return LeafCounts(paths, self.counts[start : start + len(paths)])
            start += len(paths)
        raise KeyError(tree)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.trees)

    def __len__(self) -> int:
        return len(self.trees)
