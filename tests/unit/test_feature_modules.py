"""The feature modules (npu_dsv3.features): each holds its flags, checks, config fields and patches; the
patch hook and FLAG_TABLE are built from them; `npu-dsv3 patches` lists patches by feature."""

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

import npu_dsv3
from npu_dsv3 import features
from npu_dsv3.argtypes import Unsupported
from npu_dsv3.arguments import FLAG_TABLE, OWN_FLAGS, build_parser
from npu_dsv3.layout import training_flag
from npu_dsv3.patching import patch_status, unregister

from support import REPO
from support.recipes import PRETRAIN_A2, PRETRAIN_A3, TUNE_FULL_A3, TUNE_LORA_A3_EXTRA, flags


MODULES = features.modules()


def test_every_feature_module_names_itself_and_its_tests():
    names = [m.NAME for m in MODULES]
    assert len(set(names)) == len(names)
    for m in MODULES:
        tests = [t.split(" (")[0] for t in m.TESTS.split(", ")]
        assert tests and all((REPO / t).is_file() for t in tests), (m.__name__, m.TESTS)
    assert {"kernels", "dualpipev", "tp-extend-ep", "mla-mm-split", "recompute", "model", "backend-cpu",
            "checkpoint-safety"} <= set(names)


def test_every_registered_patch_belongs_to_a_feature_module():
    npu_dsv3.setup()
    names = {m.NAME for m in MODULES}
    rows = patch_status()
    assert rows and {r["feature"] for r in rows} <= names
    # One patch per target: the order features register in does not matter.
    targets = [r["target"] for r in rows]
    assert len(set(targets)) == len(targets)


def test_the_hook_finds_a_new_feature_module_by_its_file(tmp_path, monkeypatch):
    (tmp_path / "zz_probe.py").write_text(textwrap.dedent("""
        NAME = "probe"

        def patches():
            from npu_dsv3.patching import Patch
            return [Patch(name="probe.value", feature=NAME, target="npu_dsv3.features.kernels.probe_value",
                          replacement=42, create=True, why="test")]
    """))
    monkeypatch.setattr(features, "__path__", [*features.__path__, str(tmp_path)])
    npu_dsv3.setup()
    try:
        assert "npu_dsv3.features.zz_probe" in [m.__name__ for m in features.modules()]
        assert features.kernels.probe_value == 42
        assert next(r for r in patch_status() if r["name"] == "probe.value")["feature"] == "probe"
    finally:
        unregister("probe.value")
        features._registered.remove("probe")
        sys.modules.pop("npu_dsv3.features.zz_probe", None)
    assert not hasattr(features.kernels, "probe_value")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_a_feature_declares_exactly_its_flags(module):
    """What add_flags declares, plus the layout flags it gives help for, plus the flags it refuses, is its
    FLAGS; each declared flag has help."""
    parser = argparse.ArgumentParser()
    if hasattr(module, "add_flags"):
        module.add_flags(parser)
    declared = {o for a in parser._actions if a.help != "==SUPPRESS==" for o in a.option_strings} - {"-h", "--help"}
    assert all(a.help for a in parser._actions)
    layout = {training_flag(dest) for dest in getattr(module, "LAYOUT_HELP", {})}
    refused = {f for f, w in getattr(module, "FLAGS", {}).items() if isinstance(w, Unsupported)}
    assert declared | layout | refused == set(getattr(module, "FLAGS", {}))


def test_flag_table_is_the_own_rows_and_the_features():
    assert FLAG_TABLE == {**OWN_FLAGS, **features.flag_table()}
    options = {o for a in build_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    assert options == set(FLAG_TABLE)


@pytest.mark.parametrize("text", [PRETRAIN_A3, PRETRAIN_A2, TUNE_FULL_A3, TUNE_LORA_A3_EXTRA],
                         ids=["pretrain_A3", "pretrain_A2", "tune_full_A3", "tune_lora_A3"])
def test_every_recipe_flag_is_declared_exactly_once(text):
    sources = [OWN_FLAGS] + [getattr(m, "FLAGS", {}) for m in MODULES]
    counts = {flag: sum(flag in rows for rows in sources) for flag in flags(text)}
    assert {flag: n for flag, n in counts.items() if n != 1} == {}


@pytest.mark.parametrize("recipe", ["pretrain_deepseek3_671b_4k_a2.sh", "pretrain_deepseek3_671b_4k_a3.sh",
                                    "tune_deepseek3_671b_4k_full_a3.sh", "tune_deepseek3_671b_4k_full_a2.sh",
                                    "tune_deepseek3_671b_4k_lora_a3.sh", "tune_deepseek3_671b_4k_lora_a2.sh"])
def test_shipped_recipe_flags_are_declared_exactly_once(recipe):
    env = {**os.environ, "DRY_RUN": "1", "HF_DIR": "/hf", "DATA_PATH": "/d", "CKPT_SAVE_DIR": "/c",
           "CKPT_LOAD_DIR": "/l"}
    proc = subprocess.run(["bash", str(REPO / "shell" / recipe)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    entry = next(i for i, a in enumerate(argv) if a in ("npu_dsv3.pretrain", "npu_dsv3.finetune"))
    sources = [OWN_FLAGS] + [getattr(m, "FLAGS", {}) for m in MODULES]
    counts = {flag: sum(flag in rows for rows in sources) for flag in flags(" ".join(argv[entry + 1:]))}
    assert len(counts) > 40 and {flag: n for flag, n in counts.items() if n != 1} == {}


def test_two_features_claiming_a_flag_is_an_error(monkeypatch):
    monkeypatch.setattr(features.mla_mm_split, "FLAGS", {**features.mla_mm_split.FLAGS, "--moe-fb-overlap": "x"})
    with pytest.raises(ValueError, match="--moe-fb-overlap is declared by two feature modules"):
        features.flag_table()


def test_feature_modules_import_no_megatron():
    code = ("import sys\nfrom npu_dsv3 import features\nfeatures.modules()\n"
            "print([m for m in sys.modules if m.split('.')[0] == 'megatron'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "NPU_DSV3_DEVICE": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_kernel_names_stay_importable_from_features():
    from npu_dsv3.features import FEATURES, Feature, add_feature_args, all_features, feature_overrides

    assert all(isinstance(f, Feature) for f in FEATURES) and callable(add_feature_args)
    assert all_features(True)["use_flash_attn"] is True and callable(feature_overrides)


def test_cli_lists_patches_by_feature():
    env = {**os.environ, "NPU_DSV3_DEVICE": "cpu"}
    text = subprocess.run([sys.executable, "-m", "npu_dsv3", "patches"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    headings = [line.split()[1] for line in text.stdout.splitlines() if line.startswith("feature ")]
    assert headings == [m.NAME for m in MODULES]
    info = json.loads(subprocess.run([sys.executable, "-m", "npu_dsv3", "patches", "--json"], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=120).stdout)
    assert [f["feature"] for f in info["features"]] == headings
    # each patch's target is printed under its own feature's heading
    sections = text.stdout.split("\nfeature ")[1:]
    for p in info["patches"]:
        section = next(s for s in sections if s.split()[0] == p["feature"])
        assert p["target"] in section
