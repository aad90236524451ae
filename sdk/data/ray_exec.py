"""The cluster executor of `hanlin data prepare`: Ray Data runs the per-document stage.

Why Ray Data and not datatrove: the stages are our own plain Python functions (`process` in
pipeline.py), and Ray Data maps them over blocks unchanged; the same code runs on a local
Ray instance (tests, one machine) and on a `ray start` cluster (`--ray-address` or
RAY_ADDRESS) with nothing rewritten. datatrove would need every stage rewritten as its
PipelineStep over its own Document model, and its MinHash dedup is a file-based multi-stage
job of its own. (NVIDIA NeMo Curator moved its pipeline onto Ray for the same reasons.)

Only `process` runs on the cluster; dedup, tokenization and writing stay on the driver, in
input order, which is what makes the output byte-identical to the local executor's.
Documents travel pickled (one binary column), so nothing about them is changed by Arrow's
type conversion.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Iterable, Iterator

from hanlin.data.filters import FilterConfig
from hanlin.data.pipeline import Processed, _process_chunk
from hanlin.data.readers import RawDoc

BATCH = 16  # documents per Ray task batch


def _batch_fn(batch, cfg: FilterConfig):
    import numpy as np

    raws = [pickle.loads(b) for b in batch["doc"]]
    done = _process_chunk(raws, cfg)
    return {"out": np.array([pickle.dumps(p) for p in done], dtype=object)}


def map_ray(raws: Iterable[RawDoc], cfg: FilterConfig, workers: int, address: str | None = None) -> Iterator[Processed]:
    """`process` over the documents as a Ray Data job; results in input order."""
    try:
        import ray
    except ImportError:
        from hanlin.data.errors import DataPrepError

        raise DataPrepError("--executor ray needs Ray Data: pip install -c constraints.txt 'ray[data]'") from None

    address = address or os.environ.get("RAY_ADDRESS") or None
    started = False
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # Ray Data's INFO lines would bury our progress lines
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=True)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # results in input order, as imap gives them
        ctx.enable_progress_bars = False
        items = [{"doc": pickle.dumps(r)} for r in raws]
        if not items:
            return
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // BATCH, 4 * workers)))
        ds = ds.map_batches(_batch_fn, fn_kwargs={"cfg": cfg}, batch_size=BATCH, batch_format="numpy")
        for row in ds.iter_rows():
            yield pickle.loads(row["out"])
    finally:
        data_logger.setLevel(level)
        if started:
            ray.shutdown()
