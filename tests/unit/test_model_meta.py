"""Every key export writes into a model's meta.json is used by serving or listed as
informational in one place (recmodel/ranker.py, recmodel/user_model.py): a key
export adds that serving neither reads nor lists fails here. Both rankers serving may load
carry every attribute of the Ranker interface."""

import pytest

from recmodel import modelrepo
from recmodel import user_model
from recmodel import ranker


@pytest.mark.parametrize("name, module", [("ranker", ranker), ("user_tower", user_model)])
def test_every_exported_meta_key_is_served_or_listed_as_informational(model_repo, name,
                                                                       module):
    if not modelrepo.versions(model_repo, name):
        pytest.fail(f"no {name} in {model_repo}: run `make models` (`make test` does)")
    meta = modelrepo.read_meta(modelrepo.resolve(model_repo, name))
    served, info = set(module.SERVED), set(module.INFORMATIONAL)
    assert not served & info, f"listed twice: {sorted(served & info)}"
    assert not set(meta) - served - info, (
        f"{name} meta.json keys neither served nor listed informational: "
        f"{sorted(set(meta) - served - info)}")
    assert not served - set(meta), f"serving reads keys export no longer writes: " \
                                   f"{sorted(served - set(meta))}"


def test_the_served_models_load_with_every_served_key(model_repo):
    r = ranker.OnnxRanker(modelrepo.resolve(model_repo, "ranker"))
    u = user_model.OnnxUserModel(modelrepo.resolve(model_repo, "user_tower"))
    # The ranker's history window is the tower's, and its projection is of the item space.
    assert r.history_events == u.max_events
    assert r.projection.shape[0] == u.dim


def test_both_rankers_carry_every_attribute_of_the_ranker_interface(model_repo):
    declared = list(ranker.Ranker.__annotations__)
    assert {"name", "version", "meta", "covisit", "explains", "projection"} <= set(declared)
    for served in (ranker.OnnxRanker(modelrepo.resolve(model_repo, "ranker")),
                   ranker.RetrievalOrder()):
        missing = [n for n in declared if not hasattr(served, n)]
        assert not missing, f"{type(served).__name__} lacks {missing}"
        assert isinstance(served.meta, dict) and isinstance(served.explains, bool)
