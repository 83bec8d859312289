"""Causal tracing of one prompt (rompatch.tracing.trace) on tiny models, checked against a naive
reference loop."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from rompatch.arch import get_spec
from rompatch.errors import TraceError
from rompatch.hooks import TraceDict
from rompatch.tracing.trace import (
    KINDS,
    CausalTracer,
    answer_ids,
    embedding_std,
    load_trace,
    save_trace,
    subject_range,
    trace_fact,
    wikitext_sample,
)
from tests.helpers import needs_cuda
from tests.helpers.tiny import ARCHS
from tests.helpers.tracing import PROMPT, SUBJECT, tiny


def _text(tok, text, ids, span):
    enc = tok(text, return_offsets_mapping=True)
    return "".join(text[s:e] for s, e in enc["offset_mapping"][span[0] : span[1]])


def test_subject_span_plain_and_bos(tok, tok_bos):
    plain = subject_range(tok, PROMPT, "Eiffel Tower")
    with_bos = subject_range(tok_bos, PROMPT, "Eiffel Tower")
    assert tok_bos(PROMPT)["input_ids"][0] == tok_bos.bos_token_id
    assert with_bos == (plain[0] + 1, plain[1] + 1)
    ids = tok(PROMPT)["input_ids"]
    # the covered characters are exactly the subject plus the space that its first token carries
    assert _text(tok, PROMPT, ids, plain).strip() == "Eiffel Tower"
    assert subject_range(tok, PROMPT, SUBJECT)[0] == 0


def test_subject_span_partial_tokens(tok):
    # "Eif" is not a token boundary: every token overlapping the subject belongs to it
    s, e = subject_range(tok, PROMPT, "ffel Tow")
    pieces = tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"][s:e])
    assert "".join(pieces).replace("Ġ", " ").strip().startswith("E")
    assert "Tower" in "".join(pieces)


def test_subject_span_errors(tok):
    with pytest.raises(TraceError, match="does not occur"):
        subject_range(tok, PROMPT, "Colosseum")
    with pytest.raises(TraceError, match="empty"):
        subject_range(tok, PROMPT, " ")


def test_answer_ids(tok):
    ids = answer_ids(tok, PROMPT, "Paris")
    assert tok(PROMPT + " Paris")["input_ids"] == tok(PROMPT)["input_ids"] + ids
    # editing's rule: one space before the target, whatever spaces either side brings
    assert answer_ids(tok, PROMPT, " Paris ") == ids
    with pytest.raises(TraceError, match="target is empty"):
        answer_ids(tok, PROMPT, " ")


def test_wikitext_sample_reads_paragraphs(shared_data):
    texts, path = wikitext_sample(max_chars=5_000)
    assert path.endswith("wiki.test.tokens") and sum(map(len, texts)) >= 5_000
    assert not any(t.startswith("=") for t in texts), "headings are skipped"
    assert not any(" @-@ " in t or " @,@ " in t for t in texts), "WikiText's tokenization is undone"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trace_shapes_and_invariants(arch, tok_bos):
    model = tiny(arch)
    r = trace_fact(model, tok_bos, PROMPT, "Eiffel Tower", noise_std=1.0, samples=4, window=2)
    T, L = len(tok_bos(PROMPT)["input_ids"]), model.config.num_hidden_layers
    assert r.tokens[0] == "<s>" and len(r.tokens) == T == len(r.token_ids)
    assert r.subject_range == subject_range(tok_bos, PROMPT, "Eiffel Tower")
    assert r.kinds == KINDS
    for k in KINDS:
        assert r.scores[k].shape == (T, L)
        assert np.all((r.scores[k] >= 0) & (r.scores[k] <= 1))
        # BOS precedes the subject: restoring it changes nothing
        assert np.all(r.scores[k][0] == r.corrupted_prob)
    assert abs(r.clean_prob - r.corrupted_prob) > 1e-3, "the noise must move the answer's probability"
    # restoring the last token's final hidden state is the clean run
    np.testing.assert_allclose(r.scores["hidden"][-1, -1], r.clean_prob, rtol=1e-5)
    assert r.suggested_layer == int(np.argmax(r.scores["mlp"][r.subject_range[1] - 1]))
    with torch.no_grad():
        assert r.answer_id == int(model(torch.tensor([r.token_ids])).logits[0, -1].argmax())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_restoring_every_token_at_a_layer_recovers_clean(arch, device, tok_bos):
    model = tiny(arch).to(device)
    tr = CausalTracer(model, tok_bos, PROMPT, "Eiffel Tower", noise_std=1.0, samples=5)
    T = len(tr.token_ids)
    sets = [[(t, tr.names["hidden"][layer]) for t in range(T)] for layer in range(tr.n_layers)]
    probs = tr.probabilities(sets + [[]])
    assert abs(tr.clean_prob - tr.corrupted_prob) > 1e-3
    np.testing.assert_allclose(probs[:-1], tr.clean_prob, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs[-1], tr.corrupted_prob, rtol=1e-5, atol=1e-7)


def naive_scores(model, tracer: CausalTracer, kind: str, window: int) -> np.ndarray:
    """The reference algorithm, cell by cell: one forward per cell over a batch of one clean row and
    ``samples`` corrupted rows, restoring from row 0 (kmeng01/rome trace_with_patch)."""
    spec = get_spec(model)
    S, T, L = tracer.samples, len(tracer.token_ids), tracer.n_layers
    s0, s1 = tracer.subject_range
    ids = tracer.input_ids.repeat(S + 1, 1)
    names = {"hidden": spec.block, "mlp": spec.mlp_module, "attn": spec.attn_module}[kind]

    def run(states):
        patch = defaultdict(list)
        for t, name in states:
            patch[name].append(t)

        def edit(x, layer):
            h = x[0] if isinstance(x, tuple) else x
            h = h.clone()
            if layer == spec.embed:
                h[1:, s0:s1] += tracer.noise
            for t in patch.get(layer, []):
                h[1:, t] = h[0, t]
            return (h, *x[1:]) if isinstance(x, tuple) else h

        with torch.no_grad(), TraceDict(model, [spec.embed, *patch], edit_output=edit):
            logits = model(input_ids=ids, use_cache=False).logits[1:, -1]
        return float(torch.softmax(logits.float(), -1)[:, tracer.answer_id].mean())

    out = np.zeros((T, L))
    for t in range(T):
        for layer in range(L):
            if kind == "hidden":
                layers = [layer]
            else:
                layers = range(max(0, layer - window // 2), min(L, layer - (-window // 2)))
            out[t, layer] = run([(t, names(i)) for i in layers])
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_equals_naive_loop(arch, tok_bos):
    model = tiny(arch)
    tr = CausalTracer(model, tok_bos, PROMPT, "Eiffel Tower", noise_std=1.0, samples=3)
    for kind in KINDS:
        batched = tr.scores(kind, window=2, batch_size=16)
        naive = naive_scores(model, tr, kind, window=2)
        np.testing.assert_allclose(batched, naive, rtol=1e-5, atol=1e-7, err_msg=kind)
        assert np.ptp(naive) > 1e-3, "the heatmap must not be flat"


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_matches_full_recompute(arch, tok_bos):
    model = tiny(arch)
    fast = CausalTracer(model, tok_bos, PROMPT, "Eiffel Tower", noise_std=1.0, samples=2)
    full = CausalTracer(model, tok_bos, PROMPT, "Eiffel Tower", noise_std=1.0, samples=2, reuse_prefix=False)
    assert fast._kv is not None and fast._reuse, (
        "prefix reuse should be available on every built-in architecture"
    )
    for kind in KINDS:
        np.testing.assert_allclose(
            fast.scores(kind, window=2, batch_size=6),
            full.scores(kind, window=2, batch_size=6),
            rtol=1e-5,
            atol=1e-7,
            err_msg=kind,
        )
    # replayed blocks' forwards are restored afterwards
    for i in range(fast.n_layers):
        assert "forward" not in model.get_submodule(fast.spec.block(i)).__dict__


def test_window_layers(tok):
    tr = CausalTracer(tiny("gpt2"), tok, PROMPT, SUBJECT, noise_std=1.0, samples=1, kinds=("hidden",))
    assert list(tr.window_layers(0, 10)) == [0, 1, 2, 3]
    assert list(tr.window_layers(2, 2)) == [1, 2]
    assert list(tr.window_layers(2, 3)) == [1, 2, 3]
    assert list(tr.window_layers(3, 1)) == [3]


def test_seed_and_target(tok):
    model = tiny("llama")
    a = trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, samples=3, kinds=("hidden",), seed=1)
    b = trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, samples=3, kinds=("hidden",), seed=1)
    c = trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, samples=3, kinds=("hidden",), seed=2)
    np.testing.assert_array_equal(a.scores["hidden"], b.scores["hidden"])
    assert a.corrupted_prob != c.corrupted_prob
    t = trace_fact(model, tok, PROMPT, SUBJECT, target="Paris", noise_std=1.0, samples=2, kinds=("hidden",))
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert t.answer_ids == paris and t.answer_id == paris[0] and t.target == "Paris"
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([t.token_ids])).logits[0, -1], -1)[paris[0]]
    assert t.clean_prob == pytest.approx(float(p), rel=1e-5)
    # '{}' in the prompt takes the subject
    f = trace_fact(
        model, tok, "{} is located in the city of", SUBJECT, noise_std=1.0, samples=2, kinds=("hidden",)
    )
    assert f.prompt == PROMPT


def test_bad_inputs(tok):
    model = tiny("llama")
    with pytest.raises(TraceError, match="does not occur"):
        trace_fact(model, tok, PROMPT, "Colosseum", noise_std=1.0)
    with pytest.raises(TraceError, match="unknown kind"):
        trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, kinds=("mlp", "ffn"))
    with pytest.raises(TraceError, match="window"):
        trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, window=0)
    with pytest.raises(TraceError, match="noise"):
        trace_fact(model, tok, PROMPT, SUBJECT, noise=-1.0, embed_std=None, noise_std=None)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_embedding_std_is_measured_on_what_the_model_consumes(arch, tok_bos):
    model = tiny(arch)
    texts = ["The Space Needle is located in the city of Seattle.", "Beats Music is owned by Apple."]
    es = embedding_std(model, tok_bos, texts)
    ids = torch.tensor([i for t in texts for i in tok_bos(t)["input_ids"] if i != tok_bos.bos_token_id])
    raw = model.get_input_embeddings().weight.detach()[ids].double()
    scale = (
        model.config.hidden_size**0.5 if arch.startswith("gemma") else 1.0
    )  # Gemma scales inside the module
    assert es.n_tokens == len(ids)
    assert es.value == pytest.approx(float((raw * scale).std()), rel=1e-5)
    assert "2 given text" in es.source


def test_noise_is_a_multiple_of_the_wikitext_std(tok, shared_data):
    model = tiny("llama")
    r = trace_fact(model, tok, PROMPT, SUBJECT, samples=2, kinds=("hidden",), noise=2.0)
    es = r.noise["embedding_std"]
    assert "wiki.test.tokens" in es["source"] and es["n_tokens"] > 1000
    assert r.noise["std"] == pytest.approx(2.0 * es["value"])


def test_save_and_load_trace(tok, tmp_path):
    r = trace_fact(tiny("gpt2"), tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, window=2)
    paths = save_trace(r, tmp_path)
    assert sorted(p.name for p in paths) == ["scores.json", "scores.npz"]
    back = load_trace(tmp_path)
    for k in KINDS:
        np.testing.assert_array_equal(back.scores[k], r.scores[k])
    assert back.to_dict() == r.to_dict()
    z = np.load(tmp_path / "scores.npz")
    np.testing.assert_array_equal(z["scores_mlp"], r.scores["mlp"])
    np.testing.assert_allclose(z["effect_attn"], r.scores["attn"] - r.corrupted_prob)
    assert json.loads(str(z["meta"]))["subject_range"] == list(r.subject_range)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.slow
def test_smollm2_eiffel_tower(smollm2):
    model, tok = smollm2
    r = trace_fact(model, tok, PROMPT, SUBJECT, samples=3, kinds=("hidden",))
    assert r.answer == " Paris"
    assert r.scores["hidden"].shape == (len(tok(PROMPT)["input_ids"]), 30)
    assert r.clean_prob > r.corrupted_prob + 0.3
    assert r.tokens[slice(*r.subject_range)] == ["The", " E", "iffel", " Tower"]
    # restoring the last token's state late in the network brings "Paris" back
    assert r.scores["hidden"][-1, -1] == pytest.approx(r.clean_prob, rel=1e-4)
