"""Decoder layers as the pipeline layout places them: real layers numbered by their HF
index, and ``--noop-layers`` as identity layers (see ``npu_dsv3.model.placement``)."""

from typing import Optional

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import transformer_layer
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank


class PlacedTransformerLayer(transformer_layer.TransformerLayer):
    """megatron's TransformerLayer whose ``layer_number`` is ``real_layer + 1``.

    megatron adds its chunk offset to the position in the chunk; a noop layer earlier in
    the chunk would shift that, so the position passed on is chosen to land on the real
    layer's number.
    """

    def __init__(self, config, submodules, real_layer: int, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage: Optional[int] = None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        # Looked up on the module: the offset megatron's own __init__ will add (ours, patched).
        offset = transformer_layer.get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        super().__init__(config, submodules, layer_number=real_layer + 1 - offset, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)


class NoopTransformerLayer(MegatronModule):
    """``--noop-layers``: output = input; no weights, but a place in the chunk's layer list,
    so the real layers after it keep the module index the checkpoint converter gives them.

    ``followed_by_real``: a real layer comes after it in its chunk. megatron's distributed
    checkpoint names a layer's local entries by ``layer_number - 1 - offset``, one offset per
    chunk, which cannot skip this layer's slot; such a chunk refuses torch_dist rather than
    writing entries under the wrong module.
    """

    def __init__(self, config, layer_number: int = 1, followed_by_real: bool = False, pg_collection=None,
                 vp_stage: Optional[int] = None):
        super().__init__(config)
        # 0: no real layer. megatron compares layer numbers with config.num_layers (to place
        # the final norm beside the last layer when MTP is on); 0 never matches.
        self.layer_number = 0
        self.followed_by_real = followed_by_real

    def forward(self, hidden_states, context=None, **kwargs):
        # A new tensor, as MindSpeed's NoopTransformerLayer returns: megatron's pipeline schedule
        # frees a stage's output, which must not be the stage's input.
        return hidden_states.clone(), context

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        if self.followed_by_real:
            raise ValueError(
                f"{prefix.rstrip('.')} is a noop layer before a real layer of its pipeline chunk: megatron's "
                "distributed checkpoint cannot name the layers after it; put --noop-layers at the end "
                "of the model (or of their chunks) or save the legacy per-rank format"
            )
        return {}
