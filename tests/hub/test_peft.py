"""export_peft: the LoRA adapter equals the patch, checked with the real ``peft`` library.

base + adapter (unmerged, and merged with merge_and_unload) must give the logits of base + patch
within 1e-5 in float32, on GPT-2 (Conv1D, fan_in_fan_out) and Llama tiny models, and on SmolLM2.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from rompatch.apply import patched
from rompatch.arch import get_spec
from rompatch.errors import ExportError, LineageError
from rompatch.hub.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, peft_adapter
from rompatch.patch import Patch
from tests.helpers import mixed_patch, vector_patch
from tests.helpers.tiny import make_model

peft = pytest.importorskip("peft")
TOL = 1e-5


def _ids(n: int = 2, t: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _equivalence(model_type: str, make, patches: list[Patch], out_dir, x: torch.Tensor, **kw) -> dict:
    """Max |logit difference| of adapter (unmerged, merged) vs. the in-memory patch."""
    from peft import PeftModel

    model = make()
    with torch.no_grad():
        base_logits = model(x).logits
        with patched(model, *patches):
            ref = model(x).logits
    export_peft(patches, out_dir, **kw)
    pm = PeftModel.from_pretrained(make(), str(out_dir))
    pm.eval()
    with torch.no_grad():
        unmerged = pm(x).logits
        merged_model = pm.merge_and_unload()
        merged = merged_model(x).logits
    return {
        "effect": float((ref - base_logits).abs().max()),
        "unmerged": float((unmerged - ref).abs().max()),
        "merged": float((merged - ref).abs().max()),
        "pm": pm,
    }


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_adapter_equals_patch_unmerged_and_merged(model_type, tmp_path):
    make = lambda: make_model(model_type)  # noqa: E731
    patch = mixed_patch(make())
    r = _equivalence(model_type, make, [patch], tmp_path / "adapter", _ids())
    assert r["effect"] > 1e-2  # the patch does change the logits, so equality is meaningful
    assert r["unmerged"] <= TOL
    assert r["merged"] <= TOL


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_adapter_config_and_tensors(model_type, tmp_path):
    model = make_model(model_type)
    spec = get_spec(model)
    patch = mixed_patch(model)
    out = export_peft(patch, tmp_path / "adapter")
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    m1, m2 = spec.mlp_out_module(1), spec.mlp_out_module(2)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2  # scale 1
    assert cfg["rank_pattern"] == {m2: 1} and cfg["alpha_pattern"] == {m2: 1}
    assert cfg["layers_to_transform"] == [1, 2]
    assert cfg["fan_in_fan_out"] is (model_type == "gpt2")
    assert cfg["target_modules"] == [m1.split(".1.", 1)[1]]  # "mlp.c_proj" / "mlp.down_proj"

    # Tensor names and shapes are exactly what peft itself saves for this config.
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    conf = LoraConfig.from_pretrained(str(out))
    theirs = get_peft_model_state_dict(get_peft_model(make_model(model_type), conf))
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert json.loads(meta["rompatch_patch_ids"]) == [patch.id]
    # lora_A rows are uᵀ, lora_B columns are v, in delta order.
    a = ours[f"base_model.model.{m1}.lora_A.weight"]
    b = ours[f"base_model.model.{m1}.lora_B.weight"]
    for i, d in enumerate(patch.deltas[:2]):
        assert torch.equal(a[i], d.u) and torch.equal(b[:, i], d.v)
    assert a.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_every_layer_padding_is_still_exact(model_type, tmp_path):
    """num_layers: zero weights on every layer and one rank for all (TGI/LoRAX need that shape)."""
    make = lambda: make_model(model_type)  # noqa: E731
    patch = mixed_patch(make())
    r = _equivalence(model_type, make, [patch], tmp_path / "adapter", _ids(seed=2), num_layers=4)
    assert r["unmerged"] <= TOL and r["merged"] <= TOL
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2 and cfg["rank_pattern"] == {}
    assert cfg["layers_to_transform"] == [0, 1, 2, 3]
    with safe_open(str(tmp_path / "adapter" / ADAPTER_WEIGHTS), framework="pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        spec = get_spec(make())
        zero = f.get_tensor(f"base_model.model.{spec.mlp_out_module(0)}.lora_B.weight")
    assert len(shapes) == 8 and len({s for k, s in shapes.items() if "lora_A" in k}) == 1
    assert not zero.any()
    with pytest.raises(ExportError, match="does not cover the edited layers"):
        peft_adapter(patch, num_layers=2)


def test_uniform_rank_is_still_exact(tmp_path):
    make = lambda: make_model("llama")  # noqa: E731
    patch = mixed_patch(make())
    r = _equivalence("llama", make, [patch], tmp_path / "adapter", _ids(seed=3), uniform_rank=True)
    assert r["unmerged"] <= TOL and r["merged"] <= TOL
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["layers_to_transform"] == [1, 2]


def test_only_the_edited_modules_are_wrapped(tmp_path):
    """GPT-2 has attn.c_proj and mlp.c_proj: only the patched mlp.c_proj layers may get LoRA."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = make_model("gpt2")
    out = export_peft(mixed_patch(model), tmp_path / "a")
    pm = PeftModel.from_pretrained(make_model("gpt2"), str(out))
    wrapped = sorted(
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)
    )
    assert wrapped == ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]


def test_stack_with_lineage_exports_together(tmp_path):
    from rompatch.apply import apply_patch

    make = lambda: make_model("llama")  # noqa: E731
    m = make()
    first = vector_patch(m, 1, seed=5)
    apply_patch(m, first)
    second = vector_patch(m, 1, seed=6, lineage=[first.id])  # same module: rank 2 in the adapter
    with pytest.raises(LineageError, match="export the whole stack"):
        export_peft(second, tmp_path / "alone")
    assert not (tmp_path / "alone").exists()
    r = _equivalence("llama", make, [first, second], tmp_path / "stack", _ids(seed=1))
    assert r["unmerged"] <= TOL and r["merged"] <= TOL
    cfg = json.loads((tmp_path / "stack" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {}
    # force: an adapter for a checkpoint that already holds `first`
    export_peft(second, tmp_path / "forced", force=True)
    assert json.loads((tmp_path / "forced" / ADAPTER_CONFIG).read_text())["r"] == 1


def test_output_folder_rules(tmp_path):
    model = make_model("llama")
    patch = vector_patch(model, 1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already holds other files"):
        export_peft(patch, busy)
    assert sorted(os.listdir(busy)) == ["keep.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_peft(patch, f)
    # A previous export is replaced atomically.
    out = export_peft(patch, tmp_path / "ad")
    other = vector_patch(model, 2, seed=9)
    export_peft(other, out)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["layers_to_transform"] == [2]
    assert sorted(os.listdir(tmp_path)) == ["ad", "busy", "file"]  # no temporary leftovers


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import rompatch.hub.peft as rp

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rp, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_peft(vector_patch(make_model("llama"), 1), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_base_model_name(tmp_path):
    from rompatch.models import EMBEDDED

    patch = vector_patch(make_model("llama"), 1)
    patch.base = dict(patch.base, model="smollm2-135m")
    cfg, _ = peft_adapter(patch)
    assert cfg["base_model_name_or_path"] == EMBEDDED["smollm2-135m"].hf_id
    assert cfg["revision"] is None
    cfg, _ = peft_adapter(patch, base_model_name_or_path="me/merged-checkpoint")
    assert cfg["base_model_name_or_path"] == "me/merged-checkpoint"


def test_mixed_architectures_refused():
    a = vector_patch(make_model("llama"), 1)
    b = vector_patch(make_model("gpt2"), 1)
    with pytest.raises(ExportError, match="different architectures"):
        peft_adapter([a, b])


# float32 noise floor of SmolLM2's logits (|logits| up to ~35, 30 layers): the same unpatched model
# run on a batch of 1 and of 2 already differs by ~5e-5, and so does the patched model with its
# weights rounded exactly (float64 sum, one cast) instead of rompatch's float32 accumulation. No
# float32 implementation can be within 1e-5 of another there, so in float32 the bound is 1e-4 and
# the 1e-5 equality is checked in float64, against W + Σ v uᵀ computed in float64 (rompatch's
# apply accumulates in float32 by design, which would itself add ~1e-5 there).
SMOL_FP32_TOL = 1e-4


@contextlib.contextmanager
def _exactly_patched(model, patch: Patch):
    """W ← W + Σ v uᵀ in the weight's own dtype (float64 here), restored on exit."""
    saved = {n: model.get_parameter(n).data.clone() for n in patch.parameters}
    try:
        with torch.no_grad():
            for d in patch.deltas:
                w = model.get_parameter(d.parameter)
                delta = torch.outer(d.v.to(w.dtype), d.u.to(w.dtype))  # (out, in), in the weight's dtype
                w.data += delta.T if patch.parameters[d.parameter].layout == "conv1d" else delta
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                model.get_parameter(n).data.copy_(t)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_smollm2_adapter_equals_patch(smollm2, tmp_path, dtype):
    """The real default model (30 layers, 576 → 1536 MLP): rank 2 on one layer and rank 1 on another."""
    from peft import PeftModel

    session_model, tok = smollm2
    model = session_model if dtype == torch.float32 else copy.deepcopy(session_model).to(dtype)
    p1 = vector_patch(model, 6, n=2, seed=1, scale=2.0)
    p2 = vector_patch(model, 9, n=1, seed=2, scale=2.0, subject="Bob")
    patch = Patch(deltas=p1.deltas + p2.deltas, base=p1.base, parameters={**p1.parameters, **p2.parameters})
    enc = tok(["The Eiffel Tower is located in the city of", "Alice works in the city of"], return_tensors="pt",
              padding=True)  # fmt: skip
    with torch.no_grad():
        base_logits = model(**enc).logits
        with (patched if dtype == torch.float32 else _exactly_patched)(model, patch):
            ref = model(**enc).logits
        out = export_peft(patch, tmp_path / "adapter")
        assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == (
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        )
        pm = PeftModel.from_pretrained(copy.deepcopy(model), str(out))  # the session model stays the base
        pm.to(dtype).eval()  # peft keeps adapter weights in float32 by default; compare like with like
        unmerged = pm(**enc).logits
        merged = pm.merge_and_unload()(**enc).logits
        del pm
        again = model(**enc).logits
    tol = SMOL_FP32_TOL if dtype == torch.float32 else 1e-5
    assert float((ref - base_logits).abs().max()) > 1.0  # the edit moves the logits a lot
    assert float((unmerged - ref).abs().max()) <= tol
    assert float((merged - ref).abs().max()) <= tol
    assert torch.equal(again, base_logits)  # the session model was left untouched
    if dtype == torch.float64:
        assert float((unmerged - ref).abs().max()) <= 1e-9  # exact up to float64 rounding
        assert float((merged - ref).abs().max()) <= 1e-9
