"""Wire-format helpers: packed float vectors parse to the same message as Python lists."""

import numpy as np

from crossrec.fusion.v1 import fusion_pb2
from services.common.wire import packed_floats


def test_packed_floats_give_the_bytes_a_float_list_gives():
    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    number = fusion_pb2.ProfileEvent.DESCRIPTOR.fields_by_name["item_vector"].number
    merged = fusion_pb2.ProfileEvent()
    merged.MergeFromString(packed_floats(number, vec))
    assert merged.SerializeToString() == \
        fusion_pb2.ProfileEvent(item_vector=vec.tolist()).SerializeToString()
    assert np.array_equal(np.asarray(merged.item_vector, np.float32), vec)


def test_packed_floats_take_float64_and_empty_vectors():
    merged = fusion_pb2.ProfileEvent()
    merged.MergeFromString(packed_floats(2, np.array([0.5, -1.25])))
    assert list(merged.item_vector) == [0.5, -1.25]
    empty = fusion_pb2.ProfileEvent()
    empty.MergeFromString(packed_floats(2, np.zeros(0, np.float32)))
    assert list(empty.item_vector) == []
