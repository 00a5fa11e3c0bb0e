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
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple


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


# --------------------------------------------------------------------------- the layout flags

# The layout flags training, verify and the converters share, by their argparse dest, and the value of each
# when neither the command line nor the checkpoint gives one: MindSpeed-LLM's converter defaults, which are
# also Megatron's training defaults. expert_tensor_parallel_size None stands for the tensor-parallel size
# (1 with --moe-tp-extend-ep). Every parser declares these flags with default None, so None is "not given".
LAYOUT_DEFAULTS = {
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None, "num_layers_per_virtual_pipeline_stage": None, "num_layer_list": None,
    "noop_layers": None, "schedules_method": None, "moe_grouped_gemm": False, "moe_tp_extend_ep": False,
    "mla_mm_split": False,
}


def _comparable(value):
    """One form for the ways a value is written: ``"1,2"`` and ``[1, 2]``, None and an empty list."""
    if value in ("", [], ()):
        return None
    if isinstance(value, str) and value.replace(",", "").replace(" ", "").isdigit():
        value = [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) or None
    return value


def _as_flag(flag: str, value) -> str:
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"{flag} {value}"


def training_flag(dest: str) -> str:
    """The flag of a layout dest in training and verify (the converters prefix some: --target-...)."""
    return "--" + dest.replace("_", "-")


def default_expert_tp(tensor_model_parallel_size: int, moe_tp_extend_ep: bool) -> int:
    """--expert-tensor-parallel-size when not given: the tensor-parallel size (Megatron's and MindSpeed-LLM's
    default), 1 when each tensor rank holds whole experts."""
    return 1 if moe_tp_extend_ep else tensor_model_parallel_size


def resolve_layout(given: Dict[str, object], recorded: Optional[Dict[str, object]], flag: Callable[[str], str],
                   source: str) -> Tuple[Dict[str, object], List[str]]:
    """Every layout flag: the command line's value (``given``; None = not given), else the one the checkpoint
    ``source`` records (``recorded``; None: it records none), else ``LAYOUT_DEFAULTS``.

    ``flag(dest)`` is the tool's name of a flag, for messages. Returns the values and the flags taken from
    the checkpoint (for the caller's one note). A given value the checkpoint contradicts is a LayoutError
    naming the value to pass.
    """
    values, from_record = {}, []
    for name, default in LAYOUT_DEFAULTS.items():
        value = given.get(name)
        if recorded is not None and recorded.get(name) is not None:
            stored = recorded[name]
            if value is None:
                value = stored
                from_record.append(name)
            elif _comparable(value) != _comparable(stored):
                written, asked = (_as_flag(flag(name), _comparable(v)) for v in (stored, value))
                wanted = f"drop {flag(name)}" if stored is False else f"pass {written}"
                raise LayoutError(f"{source} was written with {written}, not {asked}: {wanted} (or rewrite it in "
                                  "this layout with `npu-dsv3 convert reshard`)")
        values[name] = default if value is None else value
    expert_tp = default_expert_tp(values["tensor_model_parallel_size"], values["moe_tp_extend_ep"])
    if values["expert_tensor_parallel_size"] is None:
        values["expert_tensor_parallel_size"] = expert_tp
    # The note lists what the record changed: a recorded value equal to the default is no news.
    fallback = {**LAYOUT_DEFAULTS, "expert_tensor_parallel_size": expert_tp}
    taken = [_as_flag(flag(name), _comparable(values[name])) for name in from_record
             if _comparable(values[name]) != _comparable(fallback[name])]
    return values, taken


def layout_note(source: str, taken: List[str]) -> Optional[str]:
    """The one note line saying which layout flags came from the checkpoint (None: none did)."""
    if not taken:
        return None
    return f"{source} records its layout: using {', '.join(taken)} from it"
