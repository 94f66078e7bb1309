"""The one ONNX Runtime session factory (recmodel/ortsession.py): the options every
serving and export session is built with."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from recmodel.ortsession import CPU, ort_session


@pytest.fixture
def identity_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_session_has_every_optimisation_its_threads_and_no_spinning_by_default(identity_model):
    session = ort_session(identity_model, 3)
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 0  # ORT's default, unless asked
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == [CPU]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(["y"], {"x": x})[0], x)


def test_spinning_and_inter_op_threads_are_set_only_when_asked(identity_model):
    options = ort_session(identity_model, 1, spinning=True,
                          inter_op_threads=1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.inter_op_num_threads == 1
