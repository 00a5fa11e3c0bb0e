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

Beside it: ``ParallelLayout``, the whole layout of a checkpoint (TP / EP / expert-TP
sizes around a ``PipelineLayout``), and the layout flags every command line shares,
declared once by ``add_layout_flags`` under each tool's names (``training_flag``,
``converter_flag``) and resolved by ``layout_from_args``. Errors name the flags
through the caller's naming function. No megatron import at import time: the CLI
parsers import this module.
"""

import argparse
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

from npu_dsv3.argtypes import positive_int


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


# --------------------------------------------------------------------------- the layout flags on a command line

# dest -> the name of the converters' side-prefixed flag (MindSpeed-LLM's --target-tensor-parallel-size).
CONVERTER_SIZE_NAMES = {"tensor_model_parallel_size": "tensor_parallel_size",
                        "pipeline_model_parallel_size": "pipeline_parallel_size",
                        "expert_model_parallel_size": "expert_parallel_size"}
_SWITCHES = ("moe_grouped_gemm", "moe_tp_extend_ep", "mla_mm_split")
_LIST_METAVARS = {"num_layer_list": "N,N,...", "noop_layers": "I,I,..."}


def converter_flag(side: str, prefix_all: bool = False) -> Callable[[str], str]:
    """The converters' name of a dest on ``side`` ("target" or "source"), MindSpeed-LLM's: hf2mcore / mcore2hf
    have one megatron side and prefix only the parallel sizes (``--target-tensor-parallel-size``,
    ``--num-layer-list``); reshard has two and prefixes every flag (``--source-num-layer-list``)."""

    def name(dest: str) -> str:
        if dest in CONVERTER_SIZE_NAMES:
            return f"--{side}-{CONVERTER_SIZE_NAMES[dest].replace('_', '-')}"
        return f"--{side}-" + dest.replace("_", "-") if prefix_all else training_flag(dest)

    return name


def add_layout_flags(group, helps: Dict[str, str], flag: Callable[[str], str] = training_flag,
                     size_metavar: Optional[str] = None, list_type: Optional[Callable] = None) -> None:
    """Declares on ``group`` the layout flag of each dest of ``helps`` (``LAYOUT_DEFAULTS``' keys), in that
    order, named ``flag(dest)``, with that help and default None ("not given": ``resolve_layout`` fills it).
    The tools differ only in names, help, the sizes' metavar and the lists' type (training parses them)."""
    for dest, text in helps.items():
        if dest not in LAYOUT_DEFAULTS:
            raise ValueError(f"{dest} is not a layout flag")
        if dest in _SWITCHES:
            group.add_argument(flag(dest), action="store_true", default=None, help=text)
        elif dest == "schedules_method":
            group.add_argument(flag(dest), choices=["dualpipev"], default=None, help=text)
        elif dest in _LIST_METAVARS:
            group.add_argument(flag(dest), type=list_type, default=None, metavar=_LIST_METAVARS[dest], help=text)
        else:
            group.add_argument(flag(dest), type=positive_int, default=None, metavar=size_metavar, help=text)


def given_flags(args: argparse.Namespace, flag: Callable[[str], str] = training_flag,
                dests: Iterable[str] = tuple(LAYOUT_DEFAULTS)) -> Dict[str, object]:
    """The values parsed into ``args`` of the flags ``flag(dest)`` names, by dest (None: not given)."""
    return {dest: getattr(args, flag(dest)[2:].replace("-", "_")) for dest in dests}


def layout_from_args(args: argparse.Namespace, recorded: Optional[Dict[str, object]], source: str,
                     flag: Callable[[str], str] = training_flag) -> Tuple[Dict[str, object], Optional[str]]:
    """The layout flags parsed into ``args`` under the names ``flag`` gives, resolved by ``resolve_layout``
    against what checkpoint ``source`` records; and the note saying which came from it (None: none did)."""
    values, taken = resolve_layout(given_flags(args, flag), recorded, flag, source)
    return values, layout_note(source, taken)


# --------------------------------------------------------------------------- the whole layout of a checkpoint

@dataclass(frozen=True)
class ParallelLayout:
    """Where every tensor of a checkpoint lives: TP / EP / expert-TP sizes and the pipeline layout."""

    pipeline: PipelineLayout
    tp: int = 1
    ep: int = 1
    etp: int = 1
    grouped_gemm: bool = LAYOUT_DEFAULTS["moe_grouped_gemm"]
    tp_extend_ep: bool = False
    """``--moe-tp-extend-ep``: the TP ranks of an EP rank hold different whole experts."""
    mla_mm_split: bool = False
    """``--mla-mm-split``: MLA's up-projections stored as one linear per part (``sharding.HeadSplit``)."""

    @classmethod
    def from_flags(cls, config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                   expert_model_parallel_size=1, expert_tensor_parallel_size=None,
                   num_layers_per_virtual_pipeline_stage=None, num_layer_list=None, noop_layers=None,
                   schedules_method=None, num_layers=None, moe_grouped_gemm=LAYOUT_DEFAULTS["moe_grouped_gemm"],
                   moe_tp_extend_ep=False, mla_mm_split=False, first_k_dense_replace=None,
                   mtp_num_layers=None, flag: Callable[[str], str] = converter_flag("target")) -> "ParallelLayout":
        """The layout the converter / training flags of the same names describe.

        ``config`` is the model's: the model-size flags (``num_layers``,
        ``first_k_dense_replace``, ``mtp_num_layers``) must agree with it; build it
        from ``effective_hf_config`` to apply them. The defaults are ``LAYOUT_DEFAULTS``. ``flag(dest)`` is
        the caller's name of a flag, for messages (``training_flag``, ``converter_flag(side)``).
        """
        if expert_tensor_parallel_size is None:
            expert_tensor_parallel_size = default_expert_tp(tensor_model_parallel_size, moe_tp_extend_ep)
        noop = frozenset(int_list(noop_layers))
        par = cls(
            PipelineLayout(
                num_layers=num_layers or config.num_layers + len(noop),
                pp=pipeline_model_parallel_size,
                vpp_layers=num_layers_per_virtual_pipeline_stage,
                num_layer_list=tuple(int_list(num_layer_list)) or None,
                noop_layers=noop,
                dualpipev=schedules_method == "dualpipev",
                mtp_num_layers=config.mtp_num_layers or 0,
            ),
            tp=tensor_model_parallel_size, ep=expert_model_parallel_size, etp=expert_tensor_parallel_size,
            grouped_gemm=moe_grouped_gemm, tp_extend_ep=moe_tp_extend_ep, mla_mm_split=mla_mm_split,
        )
        check_layout(config, par, flag)
        _check_model_sizes(config, first_k_dense_replace, mtp_num_layers, flag)
        return par

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
        return rank_dir_name(tp_rank, pp_rank, ep_rank, self.pipeline.pp, self.ep)

    def ranks(self) -> Iterator[Tuple[int, int, int]]:
        for pp_rank in range(self.pipeline.pp):
            for ep_rank in range(self.ep):
                for tp_rank in range(self.tp):
                    yield tp_rank, pp_rank, ep_rank

    def chunk_key(self, chunk: int) -> str:
        return "model" if self.pipeline.num_chunks == 1 else f"model{chunk}"

    # Expert placement. Plain EP: EP rank e holds experts [e * n, (e + 1) * n), n = E / EP, sliced
    # over the expert-TP ranks. --moe-tp-extend-ep: tensor rank t of EP rank e holds the whole
    # experts [(e * TP + t) * n, (e * TP + t + 1) * n), n = E / (EP * TP); the local expert
    # offset of MindSpeed's BaseMoELayer (Ascend/MindSpeed,
    # mindspeed/core/transformer/moe/moe_feature/overlap/moe_layer.py) and the chunk index
    # ep_rank * tp + tp_rank of MindSpeed-LLM's converter (Ascend/MindSpeed-LLM,
    # mindspeed_llm/tasks/checkpoint/convert_hf2mg.py). Attention, dense MLPs and shared
    # experts stay TP-split as usual.

    def experts_per_rank(self, num_experts: int) -> int:
        return num_experts // (self.ep * self.tp if self.tp_extend_ep else self.ep)

    def local_experts(self, num_experts: int, tp_rank: int, ep_rank: int) -> range:
        """Global ids of the routed experts in rank (tp_rank, ep_rank)'s file, in local order."""
        n = self.experts_per_rank(num_experts)
        group = ep_rank * self.tp + tp_rank if self.tp_extend_ep else ep_rank
        return range(group * n, (group + 1) * n)

    def expert_home(self, num_experts: int, expert: int) -> Tuple[int, range, int]:
        """(EP rank, tensor ranks whose files hold its expert-TP slices in order, local index) of an expert."""
        group, local = divmod(expert, self.experts_per_rank(num_experts))
        if self.tp_extend_ep:
            ep_rank, tp_rank = divmod(group, self.tp)
            return ep_rank, range(tp_rank, tp_rank + 1), local
        return group, range(self.etp), local  # expert-TP rank r lives in the file of tensor rank r


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    """megatron's legacy per-rank directory: ``mp_rank_TT``, then ``_PPP`` with PP > 1, ``_EEE`` with EP > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def int_list(value) -> List[int]:
    """``"15,15,16,15"``, a list, or None -> ints (the flags take comma-separated lists)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def check_layout(config, par: ParallelLayout, flag: Callable[[str], str] = converter_flag("target")) -> None:
    """Everything that must divide, divides; the message names the flag as ``flag(dest)`` writes it."""
    tp, ep, etp, extend = (flag(dest) for dest in ("tensor_model_parallel_size", "expert_model_parallel_size",
                                                   "expert_tensor_parallel_size", "moe_tp_extend_ep"))
    if par.etp not in (1, par.tp):
        raise LayoutError(f"{etp} {par.etp} must be 1 or equal {tp} {par.tp}")
    if par.tp_extend_ep and par.etp != 1:
        raise LayoutError(f"{extend} keeps every expert whole: {etp} must be 1, not {par.etp}")
    layout = par.pipeline
    if layout.num_real_layers != config.num_layers:
        raise LayoutError(
            f"{flag('num_layers')} {layout.num_layers} minus {len(layout.noop_layers)} {flag('noop_layers')} is "
            f"{layout.num_real_layers}, but the model has {config.num_layers} layers"
        )
    if config.num_moe_experts and config.num_moe_experts % par.ep:
        raise LayoutError(f"{config.num_moe_experts} experts do not divide over {ep} {par.ep}")
    if par.tp_extend_ep and config.num_moe_experts and config.num_moe_experts % (par.ep * par.tp):
        raise LayoutError(f"{extend}: {config.num_moe_experts} experts do not divide over {ep} {par.ep} x "
                          f"{tp} {par.tp}")
    checks = [("attention heads", config.num_attention_heads, par.tp),
              ("kv_lora_rank + qk_rope_head_dim", config.kv_lora_rank + config.qk_pos_emb_head_dim, par.tp),
              ("ffn_hidden_size", config.ffn_hidden_size, par.tp)]
    if config.q_lora_rank is not None:
        checks.append(("q_lora_rank", config.q_lora_rank, par.tp))
    if config.num_moe_experts:
        checks.append(("moe_ffn_hidden_size", config.moe_ffn_hidden_size, par.etp))
    for what, size, parts in checks:
        if size % parts:
            raise LayoutError(f"{what} ({size}) does not split over {parts} tensor-parallel ranks; "
                              f"change {tp} / {etp}")


def _check_model_sizes(config, first_k_dense_replace, mtp_num_layers, flag: Callable[[str], str]) -> None:
    """The model-size flags, where given, describe ``config``."""
    from npu_dsv3.config import moe_layer_pattern_of  # imports megatron; this module must not at import time

    mtp = config.mtp_num_layers or 0
    if mtp_num_layers is not None and mtp_num_layers != mtp:
        raise LayoutError(f"{flag('mtp_num_layers')} {mtp_num_layers}, but the model config has {mtp} MTP layer(s)")
    pattern = moe_layer_pattern_of(config)
    dense = pattern.index(1) if 1 in pattern else len(pattern)
    if first_k_dense_replace is not None and min(first_k_dense_replace, config.num_layers) != dense:
        raise LayoutError(f"{flag('first_k_dense_replace')} {first_k_dense_replace}, but the model config's first "
                          f"{dense} layers are dense")
