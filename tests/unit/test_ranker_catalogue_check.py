"""The ranking service refuses a ranker trained for another catalogue than the one stored."""

import numpy as np
import pytest

from recmodel import modelrepo
from services.ranking.catalog import CatalogItem, MemoryCatalog
from recmodel.ranker import OnnxRanker
from services.ranking.server import check_trained_for


def catalogue(keys, dim=4) -> MemoryCatalog:
    catalog = MemoryCatalog(dim, "exact")
    if keys:
        catalog._apply_upsert([CatalogItem(i, p, f"t{i}") for p, i in keys],
                              np.eye(len(keys), dim, dtype=np.float32))
    return catalog


def test_a_foreign_catalogue_is_refused_naming_the_data_the_ranker_knows(model_repo):
    ranker = OnnxRanker(modelrepo.resolve(model_repo, "ranker"))
    own = ranker.covisit.keys[:3000]
    check_trained_for(ranker, catalogue([]))  # empty: being loaded
    check_trained_for(ranker, catalogue([("movies", f"m{n}") for n in range(999)]))  # too few
    # Its own items with a minority of new ones: a catalogue that grew.
    check_trained_for(ranker, catalogue(own + [("office", f"new-{n}") for n in range(1000)]))
    with pytest.raises(ValueError, match=r"trained on 'amazon-arts-office-urllm' .* only 500 "
                                         r"of this catalogue's 2,000 items"):
        check_trained_for(ranker, catalogue(own[:500] + [("movies", f"m{n}")
                                                         for n in range(1500)]))
