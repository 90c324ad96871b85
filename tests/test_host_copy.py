"""Host copies of device arrays on the monitor's threads (``penwatch.schema._host``).

``np.asarray`` of a JAX array, and dropping the last reference to one, release the GIL
inside jaxlib; on a telemetry thread that is a GIL hand-off per array while the training
thread runs Python. ``host_copy`` copies small ready CPU arrays by address instead, and
the dispatcher frees each batch's arrays once it is handled.
"""

from __future__ import annotations

import statistics
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw
from penwatch.schema._host import SMALL_BYTES, host_copy, host_rows


@pytest.mark.parametrize(
    "value",
    [
        jnp.arange(7, dtype=jnp.float32) / 3,
        jnp.array([True, False, True]),
        jnp.arange(-3, 4, dtype=jnp.int32),
        jnp.array([1.5, -2.25, jnp.nan, jnp.inf], dtype=jnp.bfloat16),
        jnp.array([0.5, 65504.0], dtype=jnp.float16),
        jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
        jnp.zeros(SMALL_BYTES // 4 + 1, jnp.float32),  # too big: np.asarray
        jnp.zeros((0,), jnp.float32),
        np.arange(4.0),
    ],
    ids=["f32", "bool", "i32", "bf16", "f16", "2d", "large", "empty", "numpy"],
)
def test_host_copy_equals_np_asarray(value):
    got = host_copy(value)
    want = np.asarray(value)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit for bit (NaN included)


@pytest.mark.parametrize(
    "values",
    [
        [jnp.arange(7, dtype=jnp.float32) / (i + 1) for i in range(5)],
        [jnp.array([True, False, i % 2 == 0]) for i in range(3)],
        [jnp.array([1.5, -2.25, jnp.nan, jnp.inf], dtype=jnp.bfloat16) * i for i in range(3)],
        [jnp.arange(4.0) + i for i in range(2)] + [np.arange(4.0, dtype=np.float32)],
        [jnp.arange(3.0), jnp.arange(3, dtype=jnp.int32), jnp.ones(3)],  # one other dtype
        [jnp.arange(12, dtype=jnp.float32).reshape(3, 4)] * 2,  # 2-d
        [jax.jit(lambda i: jnp.stack([jnp.arange(5) * i, -jnp.arange(5)], 1))(i) for i in range(3)],
        [jnp.zeros(SMALL_BYTES // 4 + 1, jnp.float32)] * 2,  # too big: np.asarray
        [jnp.asarray(i - 1, jnp.int32) for i in range(4)],  # 0-d: one value each
        [jnp.asarray(i % 2 == 0) for i in range(3)],
    ],
    ids=[
        "f32",
        "bool",
        "bf16",
        "numpy-row",
        "mixed-dtype",
        "2d",
        "2d-jit",
        "large",
        "0d",
        "0d-bool",
    ],
)
def test_host_rows_equal_stacked_np_asarray(values):
    got = host_rows(values)
    want = np.stack([np.asarray(v) for v in values])
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit for bit (NaN included)


def test_host_rows_copy_2d_arrays_by_address(monkeypatch):
    """A train step's [n, 2] leaf counts go straight into their rows, as the 1-d
    buffers do: never through host_copy (whose np.asarray would give up the GIL)."""
    import penwatch.schema._host as host_module

    counts = jax.jit(lambda i: jnp.stack([jnp.arange(4) + i, jnp.arange(4) * i], 1))
    arrays = [counts(i) for i in range(5)]
    jax.block_until_ready(arrays)

    def refuse(array):
        raise AssertionError("copied through host_copy")

    monkeypatch.setattr(host_module, "host_copy", refuse)
    np.testing.assert_array_equal(host_rows(arrays), np.stack([np.asarray(a) for a in arrays]))


def test_host_rows_refuse_a_deleted_array_and_other_shapes():
    rows = [jnp.arange(3.0), jnp.arange(3.0) + 1, jnp.arange(3.0) + 2]
    rows[1].delete()
    with pytest.raises(RuntimeError):
        host_rows(rows)
    with pytest.raises(ValueError):
        host_rows([jnp.arange(3.0), jnp.arange(4.0)])


def test_host_copy_waits_for_a_running_computation_and_refuses_deleted_arrays():
    x = jnp.ones((256, 256))
    y = jax.jit(lambda x: jnp.sum((x @ x) @ x, axis=0)[:8])(x)  # maybe not ready yet
    np.testing.assert_array_equal(host_copy(y), np.full(8, 256.0**2 * 256))
    z = jnp.arange(3.0)
    z.delete()
    with pytest.raises(RuntimeError):
        host_copy(z)


def _worker_call_times(fn, arrays) -> list[float]:
    """Wall time of ``fn`` on each array, called from a thread while this one spins in
    Python (holding the GIL whenever it can), as the training loop does."""
    times: list[float] = []

    def work() -> None:
        for a in arrays:
            t = time.perf_counter()
            fn(a)
            times.append(time.perf_counter() - t)

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        pass
    return times


def test_host_copy_keeps_the_gil_on_a_telemetry_thread():
    """Measured here (mean per call): ≈ 5-20 µs by address; ≈ 0.5-0.9 ms through
    np.asarray, which gives the GIL to the spinning thread and now and then waits a whole
    switch interval (5 ms) for it back — hence the mean, not the median."""
    f = jax.jit(lambda i: jnp.arange(16.0) * i)
    arrays = [f(float(i)) for i in range(400)]
    jax.block_until_ready(arrays)
    mean = statistics.mean(_worker_call_times(host_copy, arrays))
    assert mean < 100e-6, f"host_copy took {1e6 * mean:.0f} us per call under contention"


def test_the_monitor_frees_every_recorded_array_by_close():
    f = jax.jit(lambda i: {"l1": i * 2.0, "l1_weight": jnp.float32(1.0), "total": i})
    refs = []
    monitor = pw.Monitor("free", sinks=[], alerts=[])
    for i in range(40):
        metrics = pw.Metrics.pack(f(jnp.float32(i)), penalties=["l1"])
        refs += [weakref.ref(b) for b in metrics.buffers]
        monitor.record(i, metrics)
        del metrics
    monitor.close()
    assert monitor.stats.processed == 40
    assert all(r() is None for r in refs), "arrays still referenced after close()"
