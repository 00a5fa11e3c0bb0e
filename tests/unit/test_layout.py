"""Which layers live where: every pipeline layout the flags describe."""

import pytest

from npu_dsv3.layout import LayoutError, PipelineLayout


def _placement(layout):
    return {stage: layout.chunk_layers(*stage) for stage in layout.stages()}


def test_plain_pipeline():
    layout = PipelineLayout(8, pp=4)
    assert _placement(layout) == {(0, 0): [0, 1], (1, 0): [2, 3], (2, 0): [4, 5], (3, 0): [6, 7]}
    assert layout.has_embedding(0) and not layout.has_embedding(3)
    assert layout.has_head(3) and not layout.has_head(0)


def test_virtual_pipeline_interleaves_chunks():
    layout = PipelineLayout(8, pp=2, vpp_layers=2)
    assert layout.num_chunks == 2
    assert _placement(layout) == {(0, 0): [0, 1], (0, 1): [4, 5], (1, 0): [2, 3], (1, 1): [6, 7]}
    assert layout.last_stage() == (1, 1)


def test_num_layer_list_and_noop_layers():
    layout = PipelineLayout(64, pp=4, num_layer_list=(15, 15, 16, 18), noop_layers=frozenset({61, 62, 63}))
    assert layout.chunk_layers(3) == list(range(46, 64))
    assert layout.num_real_layers == 61
    assert [layout.real_layer(i) for i in (0, 60, 61, 63)] == [0, 60, None, None]
    mid = PipelineLayout(6, pp=2, noop_layers=frozenset({1, 5}))
    assert [mid.real_layer(i) for i in range(6)] == [0, None, 1, 2, 3, None]


def test_dualpipev_v_shape_puts_embedding_and_head_on_rank_0():
    """The published A3 recipe: 64 layers with noop 61-63, PP 8 -> 16 stages of 4 layers."""
    layout = PipelineLayout(64, pp=8, dualpipev=True, noop_layers=frozenset({61, 62, 63}), mtp_num_layers=1)
    assert layout.chunk_layers(0, 0) == [0, 1, 2, 3] and layout.chunk_layers(0, 1) == [60, 61, 62, 63]
    assert layout.chunk_layers(7, 0) == [28, 29, 30, 31] and layout.chunk_layers(7, 1) == [32, 33, 34, 35]
    assert layout.has_embedding(0, 0) and layout.has_head(0, 1) and layout.last_stage() == (0, 1)
    assert layout.has_embedding(0, 1)  # MTP's embedding lives with the head
    covered = sorted(i for stage in layout.stages() for i in layout.chunk_layers(*stage))
    assert covered == list(range(64))


@pytest.mark.parametrize("kwargs, flag", [
    (dict(num_layers=7, pp=2), "--noop-layers"),
    (dict(num_layers=8, pp=2, num_layer_list=(3, 4)), "--num-layer-list"),
    (dict(num_layers=8, pp=3, dualpipev=True), "dualpipev"),
    (dict(num_layers=8, pp=1, dualpipev=True), "dualpipev"),
    (dict(num_layers=8, pp=2, vpp_layers=3), "--num-layers-per-virtual-pipeline-stage"),
    (dict(num_layers=8, pp=2, vpp_layers=2, dualpipev=True), "cannot be combined"),
    (dict(num_layers=8, pp=2, noop_layers=frozenset({8})), "--noop-layers"),
])
def test_impossible_layouts_name_the_flag(kwargs, flag):
    with pytest.raises(LayoutError, match=flag):
        PipelineLayout(**kwargs)
