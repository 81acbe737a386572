"""The LoRA arithmetic in docs/how-lora-works.md, checked through examples/lora_math.py.

The example is imported from its file (examples/ is not a package) so the
numbers the doc prints and the numbers the tests assert come from one place.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lora_math.py"
# Same location tests/conftest.py uses: <checkout>/../shared.
SHARED_MODEL = ROOT.parent / "shared" / "models" / "deit-tiny-patch16-224"
TOL = 1e-5


@pytest.fixture(scope="module")
def lora_math():
    spec = importlib.util.spec_from_file_location("lora_math", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_math"] = module  # dataclasses/typing may look it up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("lora_math", None)


def test_toy_merge_equals_side_branch(lora_math):
    r = lora_math.toy_example()
    assert r["merged_vs_branch"] < TOL
    assert r["issue_vs_peft_naming"] < TOL
    assert r["delta_rank"] == 2


def test_toy_negative_control_detects_wrong_scaling(lora_math):
    # If the check could not fail, the test above would prove nothing.
    assert lora_math.toy_example()["wrong_scaling"] > 0.1


def test_missing_model_folder_exits_2(lora_math, tmp_path, capsys):
    assert lora_math.main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1


def test_deit_example_missing_folder_raises(lora_math, tmp_path):
    with pytest.raises(lora_math.ModelUnavailable):
        lora_math.deit_example(str(tmp_path / "nope"))


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason=f"{SHARED_MODEL} not present")
def test_deit_peft_matches_formula(lora_math):
    r = lora_math.deit_example(str(SHARED_MODEL))
    assert r["target_module"] in {"q_proj", "query"}
    assert r["scaling"] == 2.0  # lora_alpha=8 / r=4
    assert r["shapes"] == {"W": (192, 192), "A": (4, 192), "B": (192, 4)}
    assert r["module_vs_formula"] < TOL
    assert r["merged_weight_vs_formula"] < TOL
    assert r["merged_is_plain_linear"]
    assert r["logits_merged_vs_adapter"] < TOL
    # Negative controls: the adapter really changed the model, and a wrong
    # scaling is caught by the same comparison.
    assert r["logits_adapter_vs_base"] > 1e-2
    assert r["wrong_scaling"] > 0.1
    # LoRA on the query projections trains well under 1% of DeiT-tiny.
    assert r["trainable_params"] == 12 * 4 * (192 + 192)
    assert r["trainable_params"] / r["total_params"] < 0.01
