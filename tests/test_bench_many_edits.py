"""bench/many_edits.py end to end on a tiny random model: every mode whose editing API exists, N = 1, 2,
EasyEdit records written in code, a tiny perplexity text; no $ROMPATCH_DATA."""

from __future__ import annotations

import json

import pytest

from bench import many_edits as me
from rompatch.errors import RequestError
from rompatch.evaluation.easyedit import from_easyedit
from rompatch.rome import ROMEHyperParams
from tests.helpers.evaluation import model_state
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import CORPUS, make_tokenizer

HP = ROMEHyperParams(layer=1, v_steps=10, v_lr=3.0, context_length_params=((3, 2),))


def ee(case_id, prompt, subject, new, true, rephrase, locality):
    return {
        "case_id": case_id,
        "prompt": prompt,
        "subject": subject,
        "target_new": new,
        "ground_truth": true,
        "rephrase_prompt": rephrase,
        "locality_prompt": locality,
        "locality_ground_truth": true,
    }


# In a random tiny model the subject must end the prompt (see tests/test_create.py).
RECORDS = [
    ee(1, "The Space Needle is located in the city of", "the city of", "Rome", "Seattle",
       "It is a quiet town. The Space Needle is located in the city of", "The Colosseum is located in the city of"),
    ee(2, "Lionel Messi plays the sport of", "the sport of", "guitar", "football",
       "Michael Jordan plays the sport of", "Toko Yasuda plays the guitar. Miles Davis plays the sport of"),
    ee(3, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux is", "Apple", "French",
       "The capital of France is Paris. The mother tongue of Danielle Darrieux is", "The capital of Japan is"),
]  # fmt: skip


def _memit_hparams():
    try:
        from rompatch.methods.memit import MEMITHyperParams
    except ImportError:
        return None
    fields = MEMITHyperParams.__dataclass_fields__
    kw = {"layers": (1, 2)} if "layers" in fields else {}
    kw.update({k: v for k, v in {"v_steps": 10, "context_length_params": ((3, 2),)}.items() if k in fields})
    return MEMITHyperParams(**kw)


def test_many_edits_harness_on_a_tiny_model(tmp_path, monkeypatch, text_file, capsys):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROMPATCH_DATA", raising=False)
    model, tok = make_model("llama", init_range=0.3), make_tokenizer(bos=True)
    before = model_state(model)
    harness = me.Harness(
        model,
        tok,
        from_easyedit(RECORDS),
        ppl=me.ppl_windows(tok, " ".join(CORPUS) * 2, windows=2, window=32),
        prompts=CORPUS[:2],
        gen_tokens=6,
        hparams=HP,
        memit_hparams=_memit_hparams(),
        stats_data=str(text_file),
        stats_tokens=2000,
        log=lambda s: None,
    )
    out = tmp_path / "many.json"
    res = me.run_harness(harness, modes=me.MODES, ns=[1, 2], out=out, config={"model": "tiny"})
    assert model_state(model) == before, "the harness must leave the model unchanged"
    assert not res["failures"], res["failures"]

    skipped = capsys.readouterr().err
    ran = [m for m in me.MODES if me.unavailable(m) is None]
    assert {"independent", "sequential"} <= set(ran)
    for m in me.MODES:
        assert (m in ran) == (f"skipping {m}:" not in skipped)
    entries = json.loads(out.read_text())["entries"]
    assert entries == res["entries"] and "failures" not in json.loads(out.read_text())
    assert sorted((e["mode"], e["n"]) for e in entries) == sorted((m, n) for m in ran for n in (1, 2))
    for e in entries:
        for k in ("ES", "PS", "NS", "NS_unedited", "ppl", "ppl_unedited", "GE", "GE_unedited"):
            assert isinstance(e[k], float), (e["mode"], k)
        assert e["ppl"] > 1 and e["ppl_unedited"] > 1 and e["n_deltas"] >= 1
        assert e["n_matrices"] >= 1 and e["update_ratio_max"] > 0
        assert e["edit_seconds"] > 0 and e["edits_per_second"] > 0
        assert len(e["loadavg_start"]) == len(e["loadavg_end"]) == 3 and e["torch_threads"] >= 1
    by = {(e["mode"], e["n"]): e for e in entries}
    # the unedited baseline is shared; independent N=1 is the first of the N=2 deltas
    assert by["independent", 1]["ppl_unedited"] == by["sequential", 2]["ppl_unedited"]
    assert by["independent", 1]["edit_seconds"] <= by["independent", 2]["edit_seconds"]
    assert by["sequential", 1]["n_deltas"] == 1 and by["sequential", 2]["n_deltas"] == 2
    if "merged" in ran:
        assert by["merged", 2]["merge_seconds"] >= 0
    if "protected" in ran:
        assert by["protected", 2]["hparams"]["protect"] is True

    # resumed: nothing left to do, so no harness is made
    def fail():
        raise AssertionError("nothing should be recomputed")

    again = me.run_harness(fail, modes=ran, ns=[1, 2], out=out, config={"model": "tiny"})
    assert len(again["entries"]) == len(entries)

    table = me.markdown(entries)
    assert table.count("\n") == 1 + len(entries) and "| independent | 1 |" in table

    # an editor's refusal is recorded as the entry's result
    def refuse(mode, n, n_max):
        raise RequestError("refused on purpose")

    monkeypatch.setattr(harness, "edits", refuse)
    res = me.run_harness(harness, modes=["independent"], ns=[1], out=out, config={"model": "other"})
    assert res["entries"][-1]["error"] == "refused on purpose" and len(res["entries"]) == len(entries) + 1
    assert "- independent N=1: refused on purpose" in me.markdown(res["entries"])
    pytest.importorskip("matplotlib")
    me.plot(entries, tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 0


def test_perplexity_text_too_short():
    tok = make_tokenizer(bos=True)
    with pytest.raises(SystemExit, match="fewer than"):
        me.ppl_windows(tok, "The capital of Japan is Tokyo.", windows=2, window=64)


def test_command_line_without_data(tmp_path, monkeypatch):
    monkeypatch.delenv("ROMPATCH_DATA", raising=False)
    with pytest.raises(SystemExit, match="ROMPATCH_DATA"):
        me.main(["--modes", "independent", "--n", "1", "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as e:
        me.main(["--modes", "nonsense"])
    assert e.value.code == 2
