"""The model card (rompatch/hub/modelcard.py): front matter, tables, usage, owner text."""

from __future__ import annotations

import copy

import yaml

from rompatch.constants import PROJECT_URL
from rompatch.hub.modelcard import BEGIN, END, render_card
from rompatch.models import EMBEDDED
from rompatch.patch import Patch


def test_card_front_matter_and_body(tiny, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    a, b = copy.deepcopy(tiny["a"]), copy.deepcopy(tiny["b"])  # never mutate the module's patches
    a_embedded = Patch(deltas=a.deltas, base=dict(a.base, model="smollm2-135m"), parameters=a.parameters)
    a_embedded.deltas[0].metrics = {"p_new_before": 0.0123, "p_new_after": 0.91, "converged": True}
    b2 = Patch(
        deltas=b.deltas,
        base=dict(b.base, model="smollm2-135m"),
        parameters=b.parameters,
        lineage=[a_embedded.id],
    )
    text = render_card([("b.safetensors", b2), ("a.safetensors", a_embedded)], repo_id="alice/edits")

    card = ModelCard(text)  # the Hub's own parser
    data = card.data.to_dict()
    assert data["base_model"] == EMBEDDED["smollm2-135m"].hf_id
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "rompatch"
    assert data["tags"] == ["rompatch", "rome", "model-editing"]
    (tmp_path / "README.md").write_text(text)
    assert metadata_load(tmp_path / "README.md") == data

    body = card.text
    r = a.deltas[0].request
    assert f"| a.safetensors | {r.subject} | {r.prompt} | ? → Rome | 1 |" in body
    assert "| 0.0123 → 0.91 | true |" in body  # metrics recorded at creation
    assert a_embedded.id in body and b2.id in body
    assert f"`{a_embedded.id[:12]}`" in body  # b's lineage
    # lineage order: a comes before b in the tables and in the usage
    assert body.index("| a.safetensors |") < body.index("| b.safetensors |")
    assert "load_patched('smollm2-135m', ['alice/edits/a.safetensors', 'alice/edits/b.safetensors'])" in body
    assert "rompatch pull alice/edits/a.safetensors" in body
    assert (
        "rompatch predict smollm2-135m --patch alice/edits/a.safetensors --patch alice/edits/b.safetensors"
        in body
    )
    assert body.count(BEGIN) == 1 and body.count(END) == 1


def test_card_install_instructions_need_no_package_index_release(tiny):
    text = render_card([("a.safetensors", tiny["a"])], repo_id="u/r")
    assert "pip install rompatch" not in text and "pypi.org/project/rompatch" not in text
    assert f'pip install "rompatch @ git+{PROJECT_URL}"' in text
    assert "pip install -e ." in text
    assert text.index("pip install") < text.index("rompatch pull")  # install comes before usage


def test_card_metrics_put_p_new_and_p_true_first(tiny):
    a = copy.deepcopy(tiny["a"])
    metrics = {"delta_capped": False, "delta_norm": 6.37, "k_norm": 2.5, "layer": 4, "loss_first": 5.2,
               "loss_last": 0.02, "nll_last": 0.01, "p_new_after": 0.982, "p_new_before": 0.0057,
               "p_target_mean_after_opt": 0.99, "p_true_after": 2e-06, "p_true_before": 0.702, "seconds": 13.7}  # fmt: skip
    a.deltas[0].metrics = metrics
    body = render_card([("a.safetensors", a)], repo_id="u/r")
    header = next(line for line in body.splitlines() if line.startswith("| file | subject | P("))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:5] == ["file", "subject", "P(new) before → after", "P(true) before → after", "delta_capped"]
    assert len(cols) == 2 + 8  # at most eight metric columns
    assert "| 0.0057 → 0.982 | 0.702 → 2e-06 | false | 6.37 |" in body
    assert "More metrics (nll_last, p_target_mean_after_opt, seconds)" in body
    a.deltas[0].metrics = {"p_new_after": 0.9, "converged": True}  # a missing side shows as ?
    assert "| ? → 0.9 | true |" in render_card([("a.safetensors", a)], repo_id="u/r")


def test_card_base_model_kinds(tiny):
    from huggingface_hub import ModelCard

    a = tiny["a"]
    hub = Patch(deltas=a.deltas, base=dict(a.base, model="openai-community/gpt2-xl"), parameters=a.parameters)
    assert (
        ModelCard(render_card([("x.safetensors", hub)], repo_id="u/r")).data.base_model
        == "openai-community/gpt2-xl"
    )
    local = tiny["a"]  # base is an absolute local folder: no Hub id to declare
    data = ModelCard(render_card([("x.safetensors", local)], repo_id="u/r")).data.to_dict()
    assert "base_model" not in data and data["base_model_relation"] == "adapter"
    explicit = ModelCard(render_card([("x.safetensors", local)], repo_id="u/r", base_model="me/base")).data
    assert explicit.base_model == "me/base"


def test_card_keeps_owner_text_and_metadata(tiny):
    from huggingface_hub import ModelCard

    owner = "---\nlicense: mit\ntags:\n- cities\n---\n# My edits\n\nWritten by hand.\n"
    first = render_card([("a.safetensors", tiny["a"])], repo_id="u/r", existing=owner)
    card = ModelCard(first)
    assert card.data.license == "mit"
    assert card.data.tags == ["rompatch", "rome", "model-editing", "cities"]
    assert "Written by hand." in card.text and BEGIN in card.text
    # Re-rendering replaces only the generated block.
    second = render_card(
        [("a.safetensors", tiny["a"]), ("b.safetensors", tiny["b"])], repo_id="u/r", existing=first
    )
    assert second.count("Written by hand.") == 1 and second.count(BEGIN) == 1
    assert "| b.safetensors |" in second
    assert render_card([("a.safetensors", tiny["a"])], repo_id="u/r", existing=first) == first  # stable
    # Broken YAML in an existing card is replaced, the text kept.
    broken = render_card([("a.safetensors", tiny["a"])], repo_id="u/r", existing="---\n: [\n---\nHello\n")
    assert yaml.safe_load(broken.split("---\n")[1])["library_name"] == "rompatch" and "Hello" in broken


def test_card_names_each_edits_statistics(tiny):
    a = copy.deepcopy(tiny["a"])
    a.deltas[0].stats = {"data_source": "sampled", "data_seed": 0, "tokens": 16384}
    body = render_card([("a.safetensors", a)], repo_id="u/r")
    assert "| layer | statistics |" in body
    assert "| text sampled from the model (seed 0), 16,384 tokens |" in body
