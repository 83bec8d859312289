"""Causal tracing (issue 6, parts 1-2) on tiny models, checked against a naive reference loop."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rompatch.arch import get_spec
from rompatch.cli.main import cli
from rompatch.errors import MissingDependencyError, TraceError
from rompatch.hooks import TraceDict
from rompatch.tracing.known_facts import (
    _category_rows,
    load_known,
    predicts_attribute,
    save_average,
    trace_known,
)
from rompatch.tracing.trace import (
    CATEGORIES,
    KINDS,
    CausalTracer,
    _find_subject_span,
    _target_tokens,
    embedding_std,
    load_trace,
    save_trace,
    trace_fact,
)
from tests.helpers import needs_cuda
from tests.tiny import ARCHS, make_model
from tests.tiny_tokenizer import make_tokenizer

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def tiny(arch: str = "llama"):
    # A larger init than the default 0.02 gives sharp predictions, so restorations matter.
    return make_model(arch, initializer_range=0.3)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_bos():
    return make_tokenizer(bos=True)


def _text(tok, text, ids, span):
    enc = tok(text, return_offsets_mapping=True)
    return "".join(text[s:e] for s, e in enc["offset_mapping"][span[0] : span[1]])


# ------------------------------------------------------------------------------ subject spans


def test_subject_span_plain_and_bos(tok, tok_bos):
    plain = _find_subject_span(tok, PROMPT, "Eiffel Tower")
    with_bos = _find_subject_span(tok_bos, PROMPT, "Eiffel Tower")
    assert tok_bos(PROMPT)["input_ids"][0] == tok_bos.bos_token_id
    assert with_bos == (plain[0] + 1, plain[1] + 1)
    ids = tok(PROMPT)["input_ids"]
    # the covered characters are exactly the subject plus the space that its first token carries
    assert _text(tok, PROMPT, ids, plain).strip() == "Eiffel Tower"
    assert _find_subject_span(tok, PROMPT, SUBJECT)[0] == 0


def test_subject_span_partial_tokens(tok):
    # "Eif" is not a token boundary: every token overlapping the subject belongs to it
    s, e = _find_subject_span(tok, PROMPT, "ffel Tow")
    pieces = tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"][s:e])
    assert "".join(pieces).replace("Ġ", " ").strip().startswith("E")
    assert "Tower" in "".join(pieces)


def test_subject_span_left_padded_batch():
    tok = make_tokenizer(bos=True, padding_side="left")
    texts = ["Vinson Massif is located in the continent of", "Beats Music is owned by"]
    enc = tok(texts, padding=True, return_offsets_mapping=True)
    row = enc["input_ids"][1]
    n_pad = row.count(tok.pad_token_id)
    assert n_pad > 0 and row[n_pad] == tok.bos_token_id
    span = _find_subject_span(tok, texts[1], "Beats Music", offsets=enc["offset_mapping"][1])
    alone = _find_subject_span(tok, texts[1], "Beats Music")
    assert span == (alone[0] + n_pad, alone[1] + n_pad)
    assert tok.decode(row[span[0] : span[1]]).strip() == "Beats Music"


def test_subject_span_errors(tok):
    with pytest.raises(TraceError, match="does not occur"):
        _find_subject_span(tok, PROMPT, "Colosseum")
    with pytest.raises(TraceError, match="empty"):
        _find_subject_span(tok, PROMPT, " ")


def test_target_tokens(tok):
    text, ids = _target_tokens(tok, PROMPT, "Paris")
    assert text == " Paris"
    assert tok(PROMPT + text)["input_ids"] == tok(PROMPT)["input_ids"] + ids
    assert _target_tokens(tok, PROMPT + " ", "Paris")[0] == "Paris"


def test_category_rows():
    # tokens: 0 BOS, 1-3 subject, 4-7 after; categories per the paper's notebook
    assert _category_rows((1, 4), 8) == [[1], [2], [3], [4], [5, 6], [7]]
    # a one-token subject is both first and last; no middle
    assert _category_rows((2, 3), 5) == [[2], [], [2], [3], [], [4]]


# ---------------------------------------------------------------------------- the trace itself


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trace_shapes_and_invariants(arch, tok_bos):
    model = tiny(arch)
    r = trace_fact(model, tok_bos, PROMPT, "Eiffel Tower", noise_std=1.0, samples=4, window=2)
    T, L = len(tok_bos(PROMPT)["input_ids"]), model.config.num_hidden_layers
    assert r.tokens[0] == "<s>" and len(r.tokens) == T == len(r.token_ids)
    assert r.subject_range == _find_subject_span(tok_bos, PROMPT, "Eiffel Tower")
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


# ---------------------------------------------------------------------------------- noise std


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


# ------------------------------------------------------------------------------- known facts


CANDIDATES = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Beats Music is owned by", "Beats Music"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Michael Jordan plays the sport of", "Michael Jordan"),
    ("Toko Yasuda plays the", "Toko Yasuda"),
    ("The Space Needle is located in", "The Space Needle"),
    ("Apple was founded by", "Apple"),
    ("Vinson Massif is located in the continent of", "Vinson Massif"),
    ("The capital of Japan is", "Japan"),
    ("Lionel Messi plays", "Lionel Messi"),
    ("Miles Davis played the", "Miles Davis"),
    ("Audible.com is owned by", "Audible.com"),
]


def _known_records(model, tok, n=3):
    """Facts the tiny model 'knows': the attribute is its own greedy prediction."""
    recs = []
    for p, s in CANDIDATES:
        with torch.no_grad():
            nxt = int(model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1].argmax())
        attr = tok.decode([nxt]).strip()
        if attr and predicts_attribute(model, tok, p, attr):
            recs.append({"known_id": len(recs), "subject": s, "attribute": attr, "prompt": p})
    assert len(recs) >= n, "the tiny model should 'know' enough of the candidate facts"
    return recs[:n]


def test_trace_known_average_and_resume(tok, tmp_path, monkeypatch):
    model = tiny("llama")
    recs = _known_records(model, tok, n=2)
    wrong = {
        "known_id": 99,
        "subject": "Beats Music",
        "attribute": "zzzz qqqq",
        "prompt": "Beats Music is owned by",
    }
    opts = dict(noise_std=1.0, samples=2, window=2, kinds=("hidden", "mlp"))
    avg = trace_known(model, tok, [wrong, *recs], cache_dir=tmp_path / "cases", **opts)
    assert avg.n_facts == len(recs) and avg.considered == len(recs) + 1
    assert avg.skipped == {"wrong prediction": 1}
    # the rollup is the notebook's: mean restored probability per category, minus mean low score
    singles = [trace_fact(model, tok, r["prompt"], r["subject"], **opts) for r in recs]
    for k in ("hidden", "mlp"):
        for c in range(len(CATEGORIES)):
            rows = [r.scores[k][_category_rows(r.subject_range, len(r.tokens))[c]] for r in singles]
            rows = np.concatenate(rows)
            if len(rows):
                np.testing.assert_allclose(avg.mean_scores[k][c], rows.mean(0), rtol=1e-6)
        low = np.mean([r.corrupted_prob for r in singles])
        np.testing.assert_allclose(avg.effect(k), avg.mean_scores[k] - low)
    assert avg.counts[0] == len(recs)
    assert avg.peak_layer("mlp") == int(np.argmax(avg.effect("mlp")[2]))
    assert len(list((tmp_path / "cases").glob("*.json"))) == len(recs) + 1

    # resume: every fact comes from the cache, nothing is traced again
    def boom(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr("rompatch.tracing.known_facts.trace_fact", boom)
    monkeypatch.setattr("rompatch.tracing.known_facts.predicts_attribute", boom)
    again = trace_known(model, tok, [wrong, *recs], cache_dir=tmp_path / "cases", **opts)
    np.testing.assert_array_equal(again.mean_scores["mlp"], avg.mean_scores["mlp"])
    # other settings are not served from the cache
    with pytest.raises(AssertionError, match="traced again"):
        trace_known(model, tok, recs, cache_dir=tmp_path / "cases", **{**opts, "samples": 3})
    monkeypatch.undo()

    lim = trace_known(model, tok, recs, limit=1, **{**opts, "kinds": ("hidden",)})
    assert lim.n_facts == 1 and lim.kinds == ("hidden",)


def test_load_known_formats(tmp_path):
    known = [{"known_id": 5, "subject": "A", "attribute": "B", "template": "{} is in", "prompt": "A is in"}]
    cf = [
        {
            "case_id": 7,
            "requested_rewrite": {
                "prompt": "{} is in",
                "subject": "X",
                "target_new": {"str": "Y"},
                "target_true": {"str": "Z"},
            },
        }
    ]
    assert load_known(known)[0].key == "5"
    f = load_known(cf)[0]
    assert (f.prompt, f.subject, f.attribute, f.key) == ("X is in", "X", "Z", "7")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "A"}]))
    with pytest.raises(TraceError, match="record 0"):
        load_known(bad)
    with pytest.raises(TraceError, match="not found"):
        load_known(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- writers, plots


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


def test_plots_written(tok, tmp_path):
    from rompatch.tracing.plotting import plot_average, plot_layer_curves, plot_trace_all

    model = tiny("llama")
    r = trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, window=2)
    files = plot_trace_all(r, tmp_path)
    assert [f.name for f in files] == ["trace-hidden.png", "trace-mlp.png", "trace-attn.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = _known_records(model, tok, n=2)
    avg = trace_known(model, tok, recs, noise_std=1.0, samples=2, window=2)
    files = plot_average(avg, tmp_path)
    assert {f.name for f in files} == {
        "average-hidden.png",
        "average-mlp.png",
        "average-attn.png",
        "average-lines.png",
    }
    f = plot_layer_curves(
        {"a": (np.arange(4.0), np.ones(4)), "b": (np.zeros(4), None)}, tmp_path / "c.png", title="t"
    )
    assert f.read_bytes()[:4] == b"\x89PNG"
    save_average(avg, tmp_path)
    d = json.loads((tmp_path / "average.json").read_text())
    assert d["n_facts"] == avg.n_facts and len(d["effect"]["mlp"]) == len(CATEGORIES)


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tok):
    from rompatch.tracing.plotting import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'rompatch\[plot\]'"):
        require_matplotlib()


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_cli_single_prompt(model_dir, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli,
        [
            "trace",
            str(model_dir),
            "--prompt",
            PROMPT,
            "--subject",
            SUBJECT,
            "--noise-std",
            "1",
            "--samples",
            "2",
            "--window",
            "2",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "suggested edit layer:" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scores.json", "scores.npz", "trace-attn.png", "trace-hidden.png", "trace-mlp.png"]
    d = json.loads((out / "scores.json").read_text())
    assert np.asarray(d["scores"]["mlp"]).shape == (len(d["tokens"]), 4)
    assert f"suggested edit layer: {d['suggested_layer']}" in r.stdout


def test_cli_json_and_kinds(model_dir):
    r = CliRunner().invoke(
        cli,
        ["trace", str(model_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--noise-std", "1"]
        + ["--samples", "2", "--kinds", "hidden,attn", "--device", "cpu", "--json"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kinds"] == ["hidden", "attn"] and d["suggested_layer"] is None and d["files"] == []


def test_cli_errors_write_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli,
        [
            "trace",
            str(model_dir),
            "--prompt",
            PROMPT,
            "--subject",
            "Colosseum",
            "--noise-std",
            "1",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 1
    assert "Error: subject 'Colosseum' does not occur" in r.stderr
    assert not out.exists()
    r = CliRunner().invoke(
        cli,
        [
            "trace",
            str(model_dir),
            "--prompt",
            PROMPT,
            "--subject",
            SUBJECT,
            "--noise",
            "3",
            "--noise-std",
            "1",
        ],
    )
    assert r.exit_code == 2 and "not both" in r.stderr
    r = CliRunner().invoke(cli, ["trace", str(model_dir), "--prompt", PROMPT])
    assert r.exit_code == 2 and "--known FILE" in r.stderr
    r = CliRunner().invoke(
        cli, ["trace", str(model_dir), "--known", str(tmp_path / "none.json"), "-o", str(out)]
    )
    assert r.exit_code == 1 and "not found" in r.stderr and not out.exists()


def test_cli_known(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    recs = _known_records(model, tok, n=2)
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(recs))
    out = tmp_path / "known"
    args = [
        "trace",
        str(model_dir),
        "--known",
        str(facts),
        "--noise-std",
        "1",
        "--samples",
        "2",
        "--window",
        "2",
    ]
    r = CliRunner().invoke(cli, args + ["--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"facts traced: {len(recs)} of {len(recs)} checked" in r.stdout
    assert "MLP effect concentrates at layer" in r.stdout
    for name in ("average.json", "average.npz", "average-mlp.png", "average-lines.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "cases").glob("fact-*.json"))) == len(recs)


# --------------------------------------------------------------------------- the real model


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
