"""The SQLite run store: schema, batched writer, incremental reader, downsampling."""

from penwatch.store._downsample import BUCKET_DTYPE as BUCKET_DTYPE
from penwatch.store._downsample import MAX_BUCKETS as MAX_BUCKETS
from penwatch.store._downsample import bucketize as bucketize
from penwatch.store._downsample import choose_width as choose_width
from penwatch.store._downsample import combine as combine
from penwatch.store._downsample import envelope as envelope
from penwatch.store._downsample import mean as mean
from penwatch.store._reader import STEP_COLUMNS as STEP_COLUMNS
from penwatch.store._reader import EventRow as EventRow
from penwatch.store._reader import RunRow as RunRow
from penwatch.store._reader import SeriesRow as SeriesRow
from penwatch.store._reader import StoreReader as StoreReader
from penwatch.store._schema import ROLLUP_WIDTHS as ROLLUP_WIDTHS
from penwatch.store._schema import SCHEMA_VERSION as SCHEMA_VERSION
from penwatch.store._schema import StoreError as StoreError
from penwatch.store._schema import StoreUnavailableError as StoreUnavailableError
from penwatch.store._writer import StoreWriter as StoreWriter

__all__ = [
    "BUCKET_DTYPE",
    "MAX_BUCKETS",
    "ROLLUP_WIDTHS",
    "SCHEMA_VERSION",
    "STEP_COLUMNS",
    "EventRow",
    "RunRow",
    "SeriesRow",
    "StoreError",
    "StoreReader",
    "StoreUnavailableError",
    "StoreWriter",
    "bucketize",
    "choose_width",
    "combine",
    "envelope",
    "mean",
]
