"""The A2 / A3 pretraining recipes launch flags our parser accepts for their 512-device layouts
(with the released DeepSeek-V3 config.json), and they say what is missing."""

import os
import shlex
import subprocess

import pytest

from npu_dsv3.arguments import build_configs, parse_args

# recipe: (world, (TP, PP, EP, ETP), DualPipeV with overlapped pairs)
RECIPES = {"shell/pretrain_deepseek3_671b_4k_a3.sh": (512, (2, 8, 16, 1), True),
           "shell/pretrain_deepseek3_671b_4k_a2.sh": (512, (4, 8, 8, 1), False)}


@pytest.fixture(scope="module")
def hf_dir(released_config_dir):
    return released_config_dir[0]


def _dry_run(recipe: str, **env) -> list:
    proc = subprocess.run(["bash", recipe], env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_flags_parse_for_its_layout(recipe, hf_dir):
    world, (tp, pp, ep, etp), dualpipev = RECIPES[recipe]
    argv = _dry_run(recipe, HF_DIR=hf_dir, DATA_PATH="/data/corpus_text_document", CKPT_SAVE_DIR="/ckpt",
                    CKPT_LOAD_DIR="/start")
    nodes = argv[argv.index("--nnodes") + 1]
    per_node = argv[argv.index("--nproc-per-node") + 1]
    assert int(nodes) * int(per_node) == world
    flags = argv[argv.index("npu_dsv3.pretrain") + 1:]
    args = parse_args(flags, world_size=world, mode="pretrain")
    sizes = build_configs(args).parallel
    assert (sizes.tp, sizes.pp, sizes.ep, sizes.etp) == (tp, pp, ep, etp)
    assert args.load == "/start" and args.finetune and args.save == "/ckpt"
    assert args.hf["n_routed_experts"] == 256 and args.num_layers == 64 and args.noop_layers
    assert (args.schedules_method == "dualpipev", args.moe_fb_overlap) == (dualpipev, dualpipev)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_without_data_names_the_variable(recipe):
    proc = subprocess.run(["bash", recipe], env={**os.environ, "DRY_RUN": "1", "HF_DIR": "/hf", "CKPT_SAVE_DIR": "/c"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DATA_PATH" in proc.stderr
