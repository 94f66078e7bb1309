"""Reading interaction data, for the CLI, the export stage, benchmarks and tests: CSV files by
path (`files`), a data row as a behaviour event under any column layout (`rows`), and the real
datasets in ../shared/data (`shared`).

    from dataio import AMAZON, read_items, user_events
"""

from dataio.files import (ITEM_BASE_COLUMNS, csv_rows, item_texts_csv, open_csv,
                          read_items_csv)
from dataio.rows import (AMAZON_ORIGIN_MS, ORDER_STEP_MS, SHARED_COLUMNS, TIME_UNITS_MS,
                         EventColumns, action_and_weight, time_ms, to_event)
from dataio.shared import (AMAZON, MOVIELENS, data_dir, dataset_dir, dataset_file, dataset_name,
                           item_texts, iter_events, read_items, sample_titles, user_events)

__all__ = [
    "AMAZON", "AMAZON_ORIGIN_MS", "ITEM_BASE_COLUMNS", "MOVIELENS", "ORDER_STEP_MS",
    "SHARED_COLUMNS", "TIME_UNITS_MS", "EventColumns", "action_and_weight", "csv_rows",
    "data_dir", "dataset_dir", "dataset_file", "dataset_name", "item_texts", "item_texts_csv",
    "iter_events", "open_csv", "read_items", "read_items_csv", "sample_titles", "time_ms",
    "to_event", "user_events",
]
