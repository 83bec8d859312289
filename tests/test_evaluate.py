"""The evaluation suite on tiny models: CounterFact (with fluency), zsRE, resume, sequential, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import rompatch.evaluation.evaluate as evaluate_mod
from rompatch.arch import get_spec
from rompatch.cli.main import cli
from rompatch.errors import EvalError
from rompatch.evaluation.evaluate import detect_kind, load_records, read_cases, run_evaluation, summarize
from rompatch.evaluation.fluency import Consistency, GenerationSettings, generate_topk, generate_topk_ids
from rompatch.evaluation.metrics import tfidf_similarity
from rompatch.evaluation.sequential import run_sequential
from rompatch.evaluation.zsre import teacher_forced_correct, zsre_request
from rompatch.fingerprint import tensor_sha256
from rompatch.patch import load_patch
from rompatch.rome import ROMEHyperParams
from rompatch.stats import get_second_moment, key_weights_sha
from tests.tiny import make_model
from tests.tiny_tokenizer import make_tokenizer

HP = ROMEHyperParams(layer=1, v_steps=40, v_lr=3.0, context_length_params=((3, 2),))
GEN = GenerationSettings(max_out_len=14, top_k=5, seed=0)


def cf_record(case_id, prompt, subject, new, true, *, gen=("The Space Needle is",)):
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"},
            "relation_id": "P1",
        },
        "paraphrase_prompts": ["It is a quiet town. The Space Needle is located in the city of"],
        "neighborhood_prompts": ["The Colosseum is located in the city of", "The capital of Japan is"],
        "generation_prompts": list(gen),
    }


# In a random tiny model the subject must end the prompt (see tests/test_create.py).
CF = [
    cf_record(7, "The Space Needle is located in {}", "the city of", "Rome", "Seattle"),
    cf_record(9, "Lionel Messi plays {}", "the sport of", "guitar", "football"),
    cf_record(11, "The Eiffel Tower is located in {}", "the city of", "Tokyo", "Paris"),
]
ZSRE = [
    {
        "subject": "the city of",
        "src": "The Space Needle is located in the city of",
        "pred": "Paris",
        "rephrase": "The Space Needle is in the city of",
        "alt": "Paris",
        "answers": ["Rome"],
        "loc": "nq question: the capital of Japan is",
        "loc_ans": "Tokyo",
        "cond": "",
    },
    {
        "subject": "the sport of",
        "src": "Lionel Messi plays the sport of",
        "pred": "football",
        "rephrase": "Messi plays the sport of",
        "alt": "guitar",
        "answers": ["basketball"],
        "loc": "nq question: Apple was founded by",
        "loc_ans": "Steve Jobs",
        "cond": "",
    },
]


ZSRE_PREPARED = [{"case_id": i, **r} for i, r in enumerate(ZSRE)]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROMPATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny(text_file):
    model, tok = make_model("llama", init_range=0.3), make_tokenizer(bos=True)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=2000)
    return model, tok, stats


def _state(model):
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ CounterFact


def test_counterfact_before_after_with_fluency_and_consistency(tiny, tmp_path):
    model, tok, stats = tiny
    before = _state(model)
    snips = tmp_path / "snippets.json"
    snips.write_text(json.dumps([
        {"relation_id": "P1", "target_id": "Q1", "samples": [{"name": "x", "text": "Rome is the capital of Italy."}]},
        {"relation_id": "P1", "target_id": "Q9", "samples": [{"name": "y", "text": "Seattle has the Space Needle."}]},
    ]))  # fmt: skip
    cons = Consistency.load(snips)
    res = run_evaluation(
        model, tok, CF[:2], kind="counterfact", hparams=HP, stats=stats, generation=GEN, consistency=cons
    )
    assert _state(model) == before, "evaluation must leave the model unchanged"
    c = res["cases"][0]
    assert set(c["pre"]) == {"ES", "EM", "PS", "PM", "NS", "NM", "GE", "RS"} == set(c["post"])
    expected_rs = tfidf_similarity(
        " ".join(c["generations"]["post"]), "Rome is the capital of Italy.", cons.tfidf
    )
    assert c["post"]["RS"] == pytest.approx(expected_rs)
    assert c["post"]["ES"] == 1.0 and c["post"]["EM"] > c["pre"]["EM"]
    assert len(c["generations"]["pre"]) == len(CF[0]["generation_prompts"])
    assert c["generations"]["pre"][0].startswith("The Space Needle is")
    assert c["pre"]["GE"] > 0
    s = res["summary"]
    assert s["n"] == 2 and "S" in s["pre"] and "S" in s["post"] and "GE" in s["post"]
    assert s["post"]["ES"] == pytest.approx(100 * sum(x["post"]["ES"] for x in res["cases"]) / 2)
    md = res["markdown"]
    assert "| Editor | Score S | Efficacy ES" in md and "model (unedited)" in md and "ROME (layer 1)" in md
    assert "RS: TF-IDF cosine" in md and res["summary"]["post"]["RS"] is not None
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(EvalError, match="attribute_snippets format"):
        Consistency.load(tmp_path / "bad.json")


def test_summarize_keeps_old_records_working():
    old = {"pre": {"ES": 0.0, "EM": -0.1, "PS": 0.5, "PM": 0.0, "NS": 1.0, "NM": 0.2},
           "post": {"ES": 1.0, "EM": 0.6, "PS": 1.0, "PM": 0.3, "NS": 0.5, "NM": 0.1}}  # fmt: skip
    s = summarize([old, old])
    assert s["post"]["ES"] == 100.0 and s["post"]["S"] == pytest.approx(
        3 / (1 / 100 + 1 / 100 + 1 / 50), abs=0.01
    )
    assert s["pre"]["S"] == 0.0 and "GE" not in s["pre"]


def test_generation_batching_is_exact_and_seeded(tiny):
    model, tok, _ = tiny
    prompts = ["The capital of Japan is", "Apple was founded by Steve", "It"]
    greedy = GenerationSettings(max_out_len=12, top_k=1)
    batched = generate_topk(model, tok, prompts, settings=greedy)
    alone = [generate_topk(model, tok, [p], settings=greedy)[0] for p in prompts]
    assert batched == alone  # left padding + position ids: a prompt sees what it sees alone
    ids = generate_topk_ids(model, tok, prompts, settings=greedy)
    for p, t, x in zip(prompts, batched, ids):  # max_out_len counts the prompt's tokens too
        assert t.startswith(p) and len(x) == 12 and x[: len(tok(p)["input_ids"])] == tok(p)["input_ids"]
    a = generate_topk(model, tok, prompts, settings=GEN)
    assert a == generate_topk(model, tok, prompts, settings=GEN)
    assert a != generate_topk(model, tok, prompts, settings=GenerationSettings(max_out_len=14, seed=1))


# ------------------------------------------------------------------------------------ zsRE


class _Successor(torch.nn.Module):
    """A fake LM whose prediction after token t is table[t] (default t + 1)."""

    def __init__(self, vocab, table):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.table = vocab, table

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        nxt = torch.tensor(
            [[self.table.get(int(t), (int(t) + 1) % self.vocab) for t in row] for row in input_ids]
        )
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


def test_teacher_forced_token_accuracy_on_a_constructed_case():
    tok = make_tokenizer(bos=True)
    prompt, answer = "The capital of Japan is", "Steve Jobs founded Apple"
    p = tok(prompt)["input_ids"]
    from rompatch.tokens import target_ids

    t, _ = target_ids(tok, prompt, answer)
    assert len(t) >= 3
    # right after the prompt and after each answer token but the last one's predecessor: 1 miss
    table = {p[-1]: t[0]} | {t[i]: t[i + 1] for i in range(len(t) - 2)}
    table[t[-2]] = (t[-1] + 7) % len(tok)  # wrong prediction for the last answer token
    fake = _Successor(len(tok), table)
    (correct,) = teacher_forced_correct(fake, tok, [(prompt, answer)])
    assert correct == [True] * (len(t) - 1) + [False]


def test_zsre_request_follows_the_reference():
    req = zsre_request({**ZSRE[0], "case_id": 3})
    assert req.prompt == "The Space Needle is located in {}" and req.target_new == "Rome"
    assert zsre_request(ZSRE[0], target="alt").target_new == "Paris"
    with pytest.raises(EvalError):
        zsre_request(ZSRE[0], target="pred")


def test_zsre_token_accuracy_before_after(tiny, tmp_path):
    model, tok, stats = tiny
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(ZSRE))
    kind, recs = load_records(str(path))
    assert kind == "zsre" and [r["case_id"] for r in recs] == [0, 1]
    res = run_evaluation(model, tok, recs[:1], kind="zsre", hparams=HP, stats=stats, model_label="tiny")
    c = res["cases"][0]
    assert set(c["post"]) == {"efficacy", "paraphrase", "specificity"}
    assert c["post"]["efficacy"] == 1.0 and c["pre"]["efficacy"] < 1.0
    assert "| Editor | Efficacy | Paraphrase | Specificity |" in res["markdown"]
    assert res["summary"]["post"]["efficacy"] == 100.0 and "S" not in res["summary"]["post"]


def test_load_records_detects_and_refuses(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(CF))
    assert load_records(str(p), limit=2)[0] == "counterfact" and len(load_records(str(p), limit=2)[1]) == 2
    with pytest.raises(EvalError, match="holds counterfact records, not zsre"):
        load_records(str(p), kind="zsre")
    with pytest.raises(EvalError, match="cannot tell the data kind"):
        detect_kind([{"foo": 1}])
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(EvalError, match="not valid JSON"):
        load_records(str(bad))


# ----------------------------------------------------------------------------------- resume


def test_resume_after_interruption_recomputes_nothing(tiny, tmp_path, monkeypatch):
    model, tok, stats = tiny
    out = tmp_path / "run"
    calls = []
    real = evaluate_mod.edit_patch
    monkeypatch.setattr(evaluate_mod, "edit_patch", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Interrupt(Exception):
        pass

    def stop_after(k):
        seen = []

        def on_case(c):
            seen.append(c)
            if len(seen) == k:
                raise Interrupt

        return on_case

    cfg = {"test": 1}
    with pytest.raises(Interrupt):
        run_evaluation(model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config=cfg,
                       on_case=stop_after(1))  # fmt: skip
    lines = (out / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(calls) == 1 and not (out / "results.json").exists()
    first = json.loads(lines[0])
    # a write cut off mid-line is dropped and that case recomputed
    with open(out / "cases.jsonl", "a") as f:
        f.write('{"case_id": 9, "pre": {')
    res = run_evaluation(model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config=cfg)
    assert len(calls) == 3 and res["computed"] == 2
    assert [c["case_id"] for c in res["cases"]] == [7, 9, 11] and res["cases"][0] == first
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == res["summary"] and (out / "summary.md").read_text().startswith("| Editor |")
    # a complete rerun computes nothing
    again = run_evaluation(
        model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config=cfg
    )
    assert again["computed"] == 0 and len(calls) == 3 and again["summary"] == res["summary"]
    # another configuration is refused instead of mixed in
    with pytest.raises(EvalError, match="different evaluation"):
        run_evaluation(
            model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config={"test": 2}
        )


def test_read_cases_repairs_an_interrupted_jsonl(tmp_path):
    p = tmp_path / "cases.jsonl"
    p.write_text('{"case_id": 1}\n{"case_id": 2')  # killed mid-line
    assert read_cases(p) == [{"case_id": 1}] and p.read_text() == '{"case_id": 1}\n'
    p.write_text('{"case_id": 1}\n{"case_id": 2}')  # killed before the newline
    assert read_cases(p) == [{"case_id": 1}, {"case_id": 2}] and p.read_text().endswith("}\n")
    p.write_text('{"case_id": 1\n{"case_id": 2}\n')  # damage in the middle is not guessed at
    with pytest.raises(EvalError, match="line 1 is not valid JSON"):
        read_cases(p)


# ------------------------------------------------------------------------------- sequential


def test_sequential_editing_with_resume(tiny, tmp_path, monkeypatch):
    import rompatch.evaluation.sequential as seq

    model, tok, stats = tiny
    before = _state(model)
    out = tmp_path / "seq"
    calls = []
    real = seq.edit_patch

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while computing the third edit
        return real(*a, **k)

    monkeypatch.setattr(seq, "edit_patch", counting)
    kw = dict(kind="counterfact", n=3, hparams=HP, stats=stats, every=1, out_dir=out, generation=GEN,
              fluency_prompts=["The capital of Japan is"])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sequential(model, tok, CF, **kw)
    assert _state(model) == before, "an interrupted run must leave the model unchanged"
    assert len((out / "edits.jsonl").read_text().splitlines()) == 2
    res = run_sequential(model, tok, CF, **kw)
    assert len(calls) == 4, "the resumed run computes only the missing edit"
    assert _state(model) == before
    cps = res["checkpoints"]
    assert [c["n"] for c in cps] == [0, 1, 2, 3] and cps[0]["GE"] > 0
    for c in cps[1:]:
        assert len(c["ES_by_edit"]) == c["n"] and c["pre_ES"] is not None and "GE" in c
        assert c["update_ratio"] > 0
    assert "interference_median" in cps[2] and "key_overlap_whitened_mean" in cps[3]
    assert res["edits"][0]["immediate"]["ES"] == 1.0
    # the chain on disk: each patch lists its predecessors; all computed with the base statistics
    p = [load_patch(out / "patches" / f"{i:04d}.safetensors") for i in (1, 2, 3)]
    assert p[0].lineage == [] and p[1].lineage == [p[0].id] and p[2].lineage == [p[0].id, p[1].id]
    assert {d.stats["sha256"] for q in p for d in q.deltas} == {stats.sha256}
    from rompatch.apply import patched

    spec = get_spec(model)
    with patched(model, *p):  # an edit at layer 1 leaves layer 1's keys, hence C, unchanged
        assert key_weights_sha(model, 1, spec) == stats.identity["weights_sha256"]
    assert "| edits N |" in res["markdown"] and "‖ΣΔ‖₂/‖W‖₂" in res["markdown"]
    # a finished run re-applies the chain and computes nothing
    again = run_sequential(model, tok, CF, **kw)
    assert len(calls) == 4 and again["checkpoints"] == cps


def test_sequential_time_limit_stops_with_a_checkpoint_and_resumes(tiny, tmp_path):
    model, tok, stats = tiny
    out = tmp_path / "seq"
    kw = dict(kind="zsre", n=2, hparams=HP, stats=stats, checkpoints=[2], out_dir=out)
    first = run_sequential(model, tok, ZSRE_PREPARED, max_seconds=0.0, **kw)
    assert first["stopped_early"] and first["completed"] == 1
    assert [c["n"] for c in first["checkpoints"]] == [1]  # measured where it stopped, not only at marks
    c = first["checkpoints"][0]
    assert set(c) >= {"efficacy", "pre_efficacy", "specificity", "update_ratio", "efficacy_by_edit"}
    assert "Stopped early after 1 edits" in first["markdown"]
    done = run_sequential(model, tok, ZSRE_PREPARED, **kw)
    assert not done["stopped_early"] and done["completed"] == 2
    assert [c["n"] for c in done["checkpoints"]] == [1, 2] and done["edits"][0] == first["edits"][0]


# -------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", init_range=0.3).save_pretrained(d)
    make_tokenizer(bos=True).save_pretrained(d)
    return d


def _cli(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_cli_eval_counterfact_out_dir_and_resume(tiny_folder, text_file, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    out = tmp_path / "out"
    common = ["--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500, "--device", "cpu"]
    r = _cli(
        tiny_folder, "--data", data, "--limit", 1, "--gen-length", 10, "--out", out, "--no-plot", *common
    )
    assert r.exit_code == 0, r.output
    assert "| Editor | Score S |" in r.stdout and "(unedited)" in r.stdout
    assert len((out / "cases.jsonl").read_text().splitlines()) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["generation"]["max_out_len"] == 10 and "GE" in res["cases"][0]["post"]
    r = _cli(tiny_folder, "--data", data, "--limit", 1, "--gen-length", 10, "--out", out, "--no-plot", "--json",
             *common)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["computed"] == 0
    r = _cli(
        tiny_folder, "--data", data, "--limit", 1, "--gen-length", 12, "--out", out, "--no-plot", *common
    )
    assert r.exit_code == 1 and "different evaluation" in r.stderr and "generation" in r.stderr


def test_cli_eval_zsre_and_sequential_with_plots(tiny_folder, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    common = ["--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500, "--device", "cpu"]
    z = tmp_path / "z.json"
    z.write_text(json.dumps(ZSRE))
    r = _cli(tiny_folder, "--data", z, "--out", tmp_path / "z", *common)
    assert r.exit_code == 0, r.output
    assert "| Editor | Efficacy | Paraphrase | Specificity |" in r.stdout
    assert (tmp_path / "z" / "eval-zsre.png").stat().st_size > 1000
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    r = _cli(tiny_folder, "--data", data, "--sequential", 2, "--eval-every", 1, "--gen-length", 8, "--out",
             tmp_path / "s", *common)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "| edits N |" in r.stdout
    assert (tmp_path / "s" / "eval-sequential-counterfact.png").stat().st_size > 1000
    assert len(list((tmp_path / "s" / "patches").glob("*.safetensors"))) == 2


def test_cli_eval_bad_input(tiny_folder, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    r = _cli(tiny_folder, "--data", bad)
    assert r.exit_code == 1 and "cannot tell the data kind" in r.stderr
    r = _cli(tiny_folder, "--data", tmp_path / "missing.json")
    assert r.exit_code == 1 and "cannot read" in r.stderr
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    r = _cli(tiny_folder, "--data", data, "--sequential", 5, "--no-fluency", "--no-mom2", "--device", "cpu")
    assert r.exit_code == 1 and "needs 5 records" in r.stderr
    r = _cli(tiny_folder, "--data", data, "--tfidf", tmp_path)
    assert r.exit_code == 1 and "--tfidf needs --snippets" in r.stderr
