"""Which global layers (and the embedding, final norm, head and MTP) live on which
(pipeline rank, virtual chunk): the one answer the model builder, the checkpoint
converter and the schedules share.

Global layer indices count noop layers (``--noop-layers``: identity layers that
pad the layer count so it splits evenly; they hold no weights). Real layers are
the others, in order; ``real_layer`` maps a global index to the HF layer index.
Placement follows the flags' MindSpeed-LLM meaning:

- plain PP: ``num_layers / pp`` consecutive layers per rank;
- ``--num-layer-list a,b,...``: that many layers on each rank;
- VPP (``--num-layers-per-virtual-pipeline-stage L``): chunk c of rank r holds
  the L layers starting at ``(c * pp + r) * L``;
- dualpipev: 2P stages of ``num_layers / 2P`` layers; rank r holds stage r as
  chunk 0 and stage 2P-1-r as chunk 1, so rank 0 has the embedding and also the
  final norm, the head, the loss and MTP.
"""

from dataclasses import dataclass, field
from typing import FrozenSet, Iterator, List, Optional, Tuple


class LayoutError(ValueError):
    """A pipeline layout that cannot be built; the message names the flags to change."""


@dataclass(frozen=True)
class PipelineLayout:
    num_layers: int
    """Decoder layers including noop layers (``--num-layers``)."""
    pp: int = 1
    vpp_layers: Optional[int] = None
    """``--num-layers-per-virtual-pipeline-stage``."""
    num_layer_list: Optional[Tuple[int, ...]] = None
    noop_layers: FrozenSet[int] = field(default_factory=frozenset)
    dualpipev: bool = False
    mtp_num_layers: int = 0

    def __post_init__(self):
        n, pp = self.num_layers, self.pp
        if pp < 1 or n < 1:
            raise LayoutError(f"--pipeline-model-parallel-size ({pp}) and --num-layers ({n}) must be >= 1")
        bad_noop = sorted(i for i in self.noop_layers if not 0 <= i < n)
        if bad_noop:
            raise LayoutError(f"--noop-layers {bad_noop} are outside the {n} layers of --num-layers")
        exclusive = [flag for flag, on in (("--num-layers-per-virtual-pipeline-stage", self.vpp_layers),
                                           ("--num-layer-list", self.num_layer_list),
                                           ("--schedules-method dualpipev", self.dualpipev)) if on]
        if len(exclusive) > 1:
            raise LayoutError(f"{' and '.join(exclusive)} cannot be combined; use one of them")
        if self.num_layer_list is not None:
            if len(self.num_layer_list) != pp or sum(self.num_layer_list) != n or min(self.num_layer_list) < 1:
                raise LayoutError(
                    f"--num-layer-list {','.join(map(str, self.num_layer_list))} must have "
                    f"--pipeline-model-parallel-size ({pp}) positive entries summing to --num-layers ({n})"
                )
        elif self.dualpipev:
            if pp < 2 or n % (2 * pp):
                raise LayoutError(
                    f"dualpipev needs --pipeline-model-parallel-size >= 2 and --num-layers ({n}) a multiple "
                    f"of 2 x pp ({2 * pp}); pad with --noop-layers"
                )
        elif self.vpp_layers is not None:
            if self.vpp_layers < 1 or n % (pp * self.vpp_layers):
                raise LayoutError(
                    f"--num-layers ({n}) must be a multiple of pp ({pp}) x "
                    f"--num-layers-per-virtual-pipeline-stage ({self.vpp_layers})"
                )
        elif n % pp:
            raise LayoutError(
                f"--num-layers ({n}) is not divisible by --pipeline-model-parallel-size ({pp}); "
                "use --num-layer-list or --noop-layers"
            )

    @property
    def num_chunks(self) -> int:
        if self.dualpipev:
            return 2
        if self.vpp_layers is not None:
            return self.num_layers // (self.pp * self.vpp_layers)
        return 1

    @property
    def num_real_layers(self) -> int:
        return self.num_layers - len(self.noop_layers)

    def stages(self) -> Iterator[Tuple[int, int]]:
        """Every (pp rank, chunk)."""
        for rank in range(self.pp):
            for chunk in range(self.num_chunks):
                yield rank, chunk

    def chunk_layers(self, pp_rank: int, chunk: int = 0) -> List[int]:
        """Global layer indices (noop layers included) of one model chunk, in order."""
        if not (0 <= pp_rank < self.pp and 0 <= chunk < self.num_chunks):
            raise LayoutError(f"no chunk {chunk} on pipeline rank {pp_rank} of this layout")
        if self.num_layer_list is not None:
            start = sum(self.num_layer_list[:pp_rank])
            return list(range(start, start + self.num_layer_list[pp_rank]))
        if self.dualpipev:
            per_stage = self.num_layers // (2 * self.pp)
            stage = pp_rank if chunk == 0 else 2 * self.pp - 1 - pp_rank
            return list(range(stage * per_stage, (stage + 1) * per_stage))
        per_chunk = self.num_layers // (self.pp * self.num_chunks)
        start = (chunk * self.pp + pp_rank) * per_chunk
        return list(range(start, start + per_chunk))

    def first_stage(self) -> Tuple[int, int]:
        return 0, 0

    def last_stage(self) -> Tuple[int, int]:
        if self.dualpipev:
            return 0, 1
        return self.pp - 1, self.num_chunks - 1

    def has_embedding(self, pp_rank: int, chunk: int = 0) -> bool:
        """The input embedding, and on the last stage MTP's copy of it."""
        stage = (pp_rank, chunk)
        return stage == self.first_stage() or (self.mtp_num_layers > 0 and stage == self.last_stage())

    def has_head(self, pp_rank: int, chunk: int = 0) -> bool:
        """Final norm, output layer, loss (and MTP when the model has it)."""
        return (pp_rank, chunk) == self.last_stage()

    def real_layer(self, global_index: int) -> Optional[int]:
        """The HF layer index of a global layer, or None for a noop layer."""
        if global_index in self.noop_layers:
            return None
        return global_index - sum(1 for i in self.noop_layers if i < global_index)
