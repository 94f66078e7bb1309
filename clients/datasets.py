"""Moved to the dataio package; kept for export/ until issue18a merges (delete then)."""

from dataio import AMAZON as AMAZON  # kept for export/ until issue18a merges
from dataio import AMAZON_ORIGIN_MS as AMAZON_ORIGIN_MS  # kept for export/ until issue18a merges
from dataio import item_texts as item_texts  # kept for export/ until issue18a merges
from dataio import iter_events as iter_events  # kept for export/ until issue18a merges
from dataio import read_items as read_items  # kept for export/ until issue18a merges
from dataio import sample_titles as sample_titles  # kept for export/ until issue18a merges
