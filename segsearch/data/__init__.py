"""Datasets: ingest images and masks to Parquet shards + dataset.json, read them with Ray Data.

`segsearch.data.ingest(...)` is the Python twin of `segsearch ingest`. Training input lives in
`segsearch.data.ray_data` (it imports Ray), augmentation in `segsearch.data.augment`.
"""

from segsearch.data.format import DatasetInfo, read_dataset_info
from segsearch.data.ingest import ingest, write_dataset

__all__ = ["DatasetInfo", "ingest", "read_dataset_info", "write_dataset"]
