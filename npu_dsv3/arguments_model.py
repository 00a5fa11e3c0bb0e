"""The model-shape flags of ``npu_dsv3.arguments``: each names the HF ``config.json`` key it sets.

Flags are turned into an HF-style DeepSeek-V3 config dict (``hf_config_from_args``)
that ``npu_dsv3.config.hf_to_mcore_config_dpskv3`` then maps to megatron's
fields, so the derived fields (shared-expert size, the dense/MoE layer
pattern, router groups, YaRN) are computed in one place for ``--hf-config``
and for flags alike. With ``--hf-config`` the file is the base and every flag
given on the command line replaces its key; without it the base holds
Megatron / MindSpeed-LLM's defaults for the flags that have one, and the
others are required.

Every flag defaults to None, so "given on the command line" is "not None".
Aliases (MindSpeed-LLM's older names next to megatron's) share one dest; two
aliases given with different values are an error, one flag given twice
keeps the last value, as argparse does.
"""

import argparse
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple


def _scaling_factor(text: str) -> float:
    """MindSpeed recipes write ``--moe-router-topk-scaling-factor none`` for "no scaling", i.e. 1."""
    return 1.0 if text.lower() == "none" else float(text)


@dataclass(frozen=True)
class ModelFlag:
    flags: Tuple[str, ...]
    """Megatron's name first, then MindSpeed-LLM's aliases."""
    dest: str
    hf_key: Optional[str]
    """The HF config key it replaces (``rope.<key>`` for a key of ``rope_scaling``); None: set in code."""
    type: Optional[Callable] = int
    """None for a switch (present = True)."""
    help: str = ""
    choices: Optional[Sequence[str]] = None


MODEL_FLAGS = (
    ModelFlag(("--num-layers",), "num_layers", None,
              help="decoder layers including --noop-layers (HF num_hidden_layers + noop layers)"),
    ModelFlag(("--hidden-size",), "hidden_size", "hidden_size", help="model width"),
    ModelFlag(("--ffn-hidden-size",), "ffn_hidden_size", "intermediate_size", help="dense-layer MLP width"),
    ModelFlag(("--num-attention-heads",), "num_attention_heads", "num_attention_heads", help="attention heads"),
    ModelFlag(("--max-position-embeddings",), "max_position_embeddings", "max_position_embeddings",
              help="default without --hf-config: --seq-length"),
    ModelFlag(("--vocab-size",), "vocab_size", "vocab_size", help="tokenizer vocabulary, before padding"),
    ModelFlag(("--norm-epsilon",), "norm_epsilon", "rms_norm_eps", float, help="RMSNorm epsilon"),
    ModelFlag(("--init-method-std",), "init_method_std", "initializer_range", float,
              help="standard deviation of the initial weights"),
    ModelFlag(("--attention-dropout",), "attention_dropout", "attention_dropout", float,
              help="dropout of the attention probabilities"),
    ModelFlag(("--hidden-dropout",), "hidden_dropout", None, float,
              help="default 0.0 with --hf-config (HF has no hidden dropout), else megatron's 0.1"),
    # MLA
    ModelFlag(("--q-lora-rank",), "q_lora_rank", "q_lora_rank",
              help="query compression rank; without --hf-config absent means no query compression"),
    ModelFlag(("--kv-lora-rank",), "kv_lora_rank", "kv_lora_rank", help="key/value compression rank"),
    ModelFlag(("--qk-head-dim", "--qk-nope-head-dim"), "qk_head_dim", "qk_nope_head_dim",
              help="query/key head dims without RoPE"),
    ModelFlag(("--qk-pos-emb-head-dim", "--qk-rope-head-dim"), "qk_pos_emb_head_dim", "qk_rope_head_dim",
              help="query/key head dims with RoPE"),
    ModelFlag(("--v-head-dim",), "v_head_dim", "v_head_dim", help="value head dims"),
    # MoE
    ModelFlag(("--num-experts",), "num_experts", "n_routed_experts", help="routed experts"),
    ModelFlag(("--moe-router-topk",), "moe_router_topk", "num_experts_per_tok", help="routed experts per token"),
    ModelFlag(("--moe-ffn-hidden-size", "--moe-intermediate-size"), "moe_ffn_hidden_size",
              "moe_intermediate_size", help="width of each expert's MLP"),
    ModelFlag(("--n-shared-experts",), "n_shared_experts", "n_shared_experts",
              help="shared experts, each --moe-ffn-hidden-size wide"),
    ModelFlag(("--moe-shared-expert-intermediate-size",), "moe_shared_expert_intermediate_size", None,
              help="megatron's form of --n-shared-experts: their total width"),
    ModelFlag(("--first-k-dense-replace",), "first_k_dense_replace", "first_k_dense_replace",
              help="dense layers before the first MoE layer"),
    ModelFlag(("--moe-layer-freq",), "moe_layer_freq", "moe_layer_freq",
              help="after the dense layers, every N-th layer is MoE (DeepSeek-V3: 1)"),
    ModelFlag(("--moe-router-num-groups", "--n-group"), "moe_router_num_groups", "n_group",
              help="expert groups of group-limited routing"),
    ModelFlag(("--moe-router-group-topk", "--topk-group"), "moe_router_group_topk", "topk_group",
              help="groups each token may route to"),
    ModelFlag(("--moe-router-topk-scaling-factor", "--routed-scaling-factor"), "moe_router_topk_scaling_factor",
              "routed_scaling_factor", _scaling_factor, help="routed-expert output scale ('none': 1)"),
    ModelFlag(("--norm-topk-prob",), "norm_topk_prob", "norm_topk_prob", None,
              help="renormalise the top-k routing weights to sum to 1"),
    ModelFlag(("--moe-router-score-function",), "moe_router_score_function", "scoring_func", str,
              help="router scores (DeepSeek-V3: sigmoid)", choices=("softmax", "sigmoid")),
    ModelFlag(("--moe-router-enable-expert-bias",), "moe_router_enable_expert_bias", None, None,
              help="aux-loss-free balancing: a per-expert bias steers selection (HF topk_method noaux_tc)"),
    ModelFlag(("--seq-aux",), "seq_aux", "seq_aux", None,
              help="sequence-wise balance loss (megatron's seq_aux_loss) with --moe-aux-loss-coeff"),
    ModelFlag(("--mtp-num-layers",), "mtp_num_layers", "num_nextn_predict_layers",
              help="multi-token-prediction depth; 0 for none"),
    ModelFlag(("--untie-embeddings-and-output-weights",), "untie_embeddings_and_output_weights", None, None,
              help="separate output layer (DeepSeek-V3); without it and without --hf-config they are tied"),
    # RoPE / YaRN
    ModelFlag(("--rotary-base",), "rotary_base", None, float, help="RoPE theta (HF rope_theta)"),
    ModelFlag(("--rope-scaling-type",), "rope_scaling_type", "rope.type", str, help="yarn: YaRN context extension",
              choices=("yarn",)),
    ModelFlag(("--rope-scaling-factor",), "rope_scaling_factor", "rope.factor", float,
              help="YaRN: context extension factor"),
    ModelFlag(("--rope-scaling-original-max-position-embeddings",), "rope_scaling_original_max_position_embeddings",
              "rope.original_max_position_embeddings", help="YaRN: the context length before extension"),
    ModelFlag(("--rope-scaling-beta-fast", "--beta-fast"), "beta_fast", "rope.beta_fast", float,
              help="YaRN: dimensions with more rotations than this over the original context keep their frequency"),
    ModelFlag(("--rope-scaling-beta-slow", "--beta-slow"), "beta_slow", "rope.beta_slow", float,
              help="YaRN: dimensions with fewer rotations than this are fully interpolated"),
    ModelFlag(("--rope-scaling-mscale",), "rope_scaling_mscale", "rope.mscale", float,
              help="YaRN: attention temperature scale"),
    ModelFlag(("--rope-scaling-mscale-all-dim",), "rope_scaling_mscale_all_dim", "rope.mscale_all_dim", float,
              help="YaRN: the temperature scale's divisor"),
)

# Without --hf-config: the defaults Megatron / MindSpeed-LLM give these flags when absent
# (softmax routing without groups or bias, every layer MoE, tied embeddings, no MTP, plain RoPE).
FLAGS_ONLY_BASE = {
    "model_type": "deepseek_v3", "q_lora_rank": None, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
    "attention_dropout": 0.1, "scoring_func": "softmax", "seq_aux": False, "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
    "moe_layer_freq": 1, "n_shared_experts": 0, "num_nextn_predict_layers": 0, "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
FLAGS_ONLY_HIDDEN_DROPOUT = 0.1


class AliasStore(argparse.Action):
    """Store, refusing two different aliases of one dest that disagree."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_alias_given", {})
        previous = given.get(self.dest)
        value = True if self.nargs == 0 else values
        if previous and previous[0] != option_string and previous[1] != value:
            parser.error(f"{option_string} {value} contradicts {previous[0]} {previous[1]}; give one of them")
        given[self.dest] = (option_string, value)
        setattr(namespace, self.dest, value)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model shape (default: --hf-config's value)")
    group.add_argument("--hf-config", metavar="PATH",
                       help="HF model directory or config.json supplying every model-shape flag; flags given win")
    for flag in MODEL_FLAGS:
        kwargs = dict(dest=flag.dest, default=None, action=AliasStore, help=flag.help or None)
        if flag.type is None:
            kwargs["nargs"] = 0
        else:
            kwargs.update(type=flag.type, choices=flag.choices)
        group.add_argument(*flag.flags, **kwargs)


def flag_name(dest: str) -> str:
    """The flag of a dest with its aliases, for messages: ``--moe-router-num-groups (--n-group)``."""
    for flag in MODEL_FLAGS:
        if flag.dest == dest:
            return flag.flags[0] + (f" ({', '.join(flag.flags[1:])})" if len(flag.flags) > 1 else "")
    raise KeyError(dest)


# HF keys a flags-only model must get from a flag, with the flag that sets each.
_REQUIRED = (
    ("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"), ("num_attention_heads", "num_attention_heads"),
    ("vocab_size", "vocab_size"), ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_head_dim"),
    ("qk_rope_head_dim", "qk_pos_emb_head_dim"), ("v_head_dim", "v_head_dim"),
    ("n_routed_experts", "num_experts"), ("num_experts_per_tok", "moe_router_topk"),
    ("moe_intermediate_size", "moe_ffn_hidden_size"),
)


def hf_config_from_args(args: argparse.Namespace, base: Optional[dict], noop_layers: int,
                        seq_length: Optional[int]) -> dict:
    """The HF DeepSeek-V3 config dict the model-shape flags describe over ``base`` (``--hf-config``'s)."""
    hf = dict(base) if base is not None else dict(FLAGS_ONLY_BASE)
    for flag in MODEL_FLAGS:
        value = getattr(args, flag.dest)
        if value is not None and flag.hf_key and not flag.hf_key.startswith("rope."):
            hf[flag.hf_key] = value
    if hf.get("routed_scaling_factor") is None:
        hf["routed_scaling_factor"] = 1.0
    if args.num_layers is not None:
        hf["num_hidden_layers"] = args.num_layers - noop_layers
    if args.untie_embeddings_and_output_weights:
        hf["tie_word_embeddings"] = False
    if base is None and "max_position_embeddings" not in hf and seq_length is not None:
        hf["max_position_embeddings"] = seq_length  # megatron's default for RoPE models
    if base is None:
        _require(hf)
    _shared_experts(args, hf)
    _rope(args, hf)
    hf["topk_method"] = _topk_method(args, hf, base is None)
    return hf


def _require(hf: dict) -> None:
    missing = [flag_name(dest) for key, dest in _REQUIRED if hf.get(key) is None]
    if missing:
        raise ValueError(f"without --hf-config the model needs {', '.join(missing)}")
    if "max_position_embeddings" not in hf:
        raise ValueError("without --hf-config the model needs --max-position-embeddings or --seq-length")


def _shared_experts(args, hf: dict) -> None:
    size = args.moe_shared_expert_intermediate_size
    if size is None:
        return
    width = hf["moe_intermediate_size"]
    if size % width or (args.n_shared_experts is not None and size != args.n_shared_experts * width):
        raise ValueError(f"--moe-shared-expert-intermediate-size {size} must be --n-shared-experts x "
                         f"--moe-ffn-hidden-size ({width})")
    hf["n_shared_experts"] = size // width


def _rope(args, hf: dict) -> None:
    """The rope flags replace single keys of the base's rope_scaling (or transformers-5 rope_parameters)."""
    given = {flag.hf_key[len("rope."):]: getattr(args, flag.dest) for flag in MODEL_FLAGS
             if flag.hf_key and flag.hf_key.startswith("rope.") and getattr(args, flag.dest) is not None}
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if given:
        if "type" in given:
            rope["rope_type"] = given["type"]  # config.py reads rope_type before type
        rope.update(given)
        if rope.get("rope_type", rope.get("type", "default")) != "yarn":
            raise ValueError(f"--rope-scaling-{sorted(given)[0].replace('_', '-')} needs --rope-scaling-type yarn")
    if args.rotary_base is not None:
        hf["rope_theta"] = args.rotary_base
        if "rope_theta" in rope:
            rope["rope_theta"] = args.rotary_base
    if rope:
        hf["rope_scaling"] = rope


def _topk_method(args, hf: dict, flags_only: bool) -> str:
    """HF topk_method, which is how config.py learns about expert bias and groups."""
    groups = (hf.get("n_group") or 1) > 1
    if args.moe_router_enable_expert_bias or args.moe_router_load_balancing_type == "noaux_tc":
        return "noaux_tc"
    current = None if flags_only else hf.get("topk_method", "noaux_tc")
    if current == "noaux_tc":
        return current
    return "group_limited_greedy" if groups else "greedy"

