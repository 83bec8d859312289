"""Keys in patches, merged stacks (rompatch/merge.py), batch edits and protection (rompatch/create.py)
on tiny models of every architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rompatch.apply import apply_patch, patched, revert_patch
from rompatch.create import Editor, create_patch, create_patches
from rompatch.errors import MergeError, RequestError
from rompatch.merge import joint_solve, merge_patches
from rompatch.patch import Patch, load_patch, new_patch
from rompatch.request import EditRequest
from rompatch.stack import stack_patches
from rompatch.stats import get_second_moment
from tests.helpers import HP, REQ, edit_model, edit_tokenizer
from tests.helpers.tiny import ARCHS

REQS = [
    REQ,
    EditRequest("{} plays the sport of", "Michael Jordan", "football", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} was founded by", "Apple", "Bill Gates", "Steve Jobs"),
]
FAST = dataclasses.replace(HP, v_steps=6)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def _editor(arch, text_file, **hp):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    return Editor(model, tok, hparams=dataclasses.replace(FAST, **hp), stats=stats)


def _change(patch: Patch, parameter: str, k: torch.Tensor) -> torch.Tensor:
    """The patch's change of the matrix output at key k (float64 from the stored float32 factors)."""
    out = torch.zeros_like(patch.deltas[0].v, dtype=torch.float64)
    for d in patch.deltas:
        if d.parameter == parameter:
            out += d.v.double() * float(d.u.double() @ k.double())
    return out


def _split(p: Patch) -> list[Patch]:
    return [new_patch([d], base=p.base, parameters=p.parameters, lineage=p.lineage) for d in p.deltas]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_stack_is_exact_at_every_key(arch, text_file):
    ed = _editor(arch, text_file)
    independent = ed.patch(REQS)
    assert all(d.key is not None and d.key.shape == d.u.shape for d in independent.deltas)
    merged = merge_patches(_split(independent))
    name = independent.deltas[0].parameter
    worst_plain = 0.0
    for d in independent.deltas:
        own = d.v.double() * float(d.u.double() @ d.key.double())  # the edit's target change δ
        assert _rel(_change(merged, name, d.key), own) < 1e-5
        worst_plain = max(worst_plain, _rel(_change(independent, name, d.key), own))
    assert worst_plain > 1e-3, "a plain stack has cross-talk: this test would not see a wrong merge"
    # applied to the model, in float32 weights: the matrix's output at each key moves by the target
    module = ed.model.get_submodule(ed.target.module)
    for d in independent.deltas:
        k = d.key.to(module.weight.dtype)[None]
        with torch.no_grad():
            before = module(k)[0].double()
            with patched(ed.model, merged):
                after = module(k)[0].double()
        own = d.v.double() * float(d.u.double() @ d.key.double())
        tol = 1e-4 if module.weight.dtype == torch.float32 else 5e-2
        assert _rel(after - before, own) < tol


def test_batch_of_one_equals_a_single_edit(text_file):
    ed = _editor("llama", text_file)
    single = ed.patch([REQ]).deltas[0]
    batch = ed.batch([REQ]).deltas[0]
    assert torch.equal(batch.u, single.u) and torch.equal(batch.key, single.key)
    assert torch.allclose(batch.v, single.v, rtol=1e-5, atol=1e-6)
    assert batch.hparams["solve"] == "joint" and "solve" not in single.hparams


def test_batch_equals_the_merge_of_independent_edits(text_file):
    ed = _editor("llama", text_file)
    batch = ed.batch(REQS, chunk=3)  # two chunks: the δ optimisation is batched 3 + 1
    merged = merge_patches(_split(ed.patch(REQS)))
    for b, m in zip(batch.deltas, merged.deltas):
        assert torch.equal(b.u, m.u) and torch.equal(b.key, m.key)
        assert _rel(b.v.double(), m.v.double()) < 1e-4


def test_merge_of_merges_equals_one_merge(text_file):
    ed = _editor("llama", text_file)
    parts = _split(ed.patch(REQS))
    once = merge_patches(parts)
    twice = merge_patches([merge_patches(parts[:2]), merge_patches(parts[2:])])
    for a, b in zip(once.deltas, twice.deltas):
        assert torch.equal(a.u, b.u) and _rel(a.v.double(), b.v.double()) < 1e-5
    info = twice.merged_from()
    assert [c["deltas"] for c in info["inputs"]] == [[0, 2], [2, 4]]
    assert next(iter(info["condition"].values())) >= 1.0


def test_merging_a_sequential_chain_keeps_each_edits_recorded_target(text_file):
    ed = _editor("llama", text_file)
    chain = ed.chain(REQS)
    merged = merge_patches(chain)
    assert merged.lineage == []
    name = chain[0].deltas[0].parameter
    for j, p in enumerate(chain):
        k = p.deltas[0].key
        # what the sequential model did at k_j right after edit j: edits 0..j, all at this matrix
        target = sum(_change(q, name, k) for q in chain[: j + 1])
        assert _rel(_change(merged, name, k), target) < 1e-5


def test_protected_keys_see_no_change(text_file):
    ed = _editor("llama", text_file, protect=True, protect_principal=4)
    first = ed.patch(REQS[:2])
    apply_patch(ed.model, first)
    try:
        second = ed.patch(REQS[2:])
    finally:
        revert_patch(ed.model, first)
    assert second.lineage == [first.id]
    name = first.deltas[0].parameter
    protected = [d.key for d in first.deltas] + list(ed.stats.principal_directions(4).float())
    for q in protected:
        change = _change(second, name, q)
        scale = sum(float(d.v.norm() * d.u.norm()) for d in second.deltas) * float(q.norm())
        assert float(change.norm()) < 1e-6 * scale
    assert all(d.metrics["protected_directions"] == 6 for d in second.deltas)
    # without protection the same keys do move (so the test above can fail)
    unprotected = create_patch(ed.model, ed.tok, REQS[2:], hparams=FAST, stats=ed.stats, on=[first])
    assert unprotected.lineage == [first.id]
    moved = max(float(_change(unprotected, name, d.key).norm()) for d in first.deltas)
    assert moved > 1e-3


def test_create_on_records_lineage_and_leaves_the_model_unchanged(text_file):
    ed = _editor("llama", text_file)
    first = ed.patch([REQS[0]])
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    chain = create_patches(ed.model, ed.tok, REQS[1:3], hparams=FAST, stats=ed.stats, on=[first])
    assert chain[0].lineage == [first.id] and chain[1].lineage == [first.id, chain[0].id]
    assert all(torch.equal(v, ed.model.state_dict()[k]) for k, v in before.items())


def test_merge_refusals(text_file, tmp_path):
    ed = _editor("llama", text_file)
    parts = _split(ed.patch(REQS[:2]))
    keyless = dataclasses.replace(parts[0].deltas[0], key=None)
    old = new_patch([keyless], base=parts[0].base, parameters=parts[0].parameters)
    with pytest.raises(MergeError, match=r"delta 0 has no key .*re-create the patch"):
        merge_patches([old, parts[1]])
    with pytest.raises(
        MergeError, match="is a plain stack of 2 patches; .*merge the patches it was stacked from"
    ):
        merge_patches([stack_patches(parts)])
    twin = new_patch(
        [dataclasses.replace(parts[0].deltas[0])], base=parts[0].base, parameters=parts[0].parameters
    )
    twin.deltas[0].hparams = {**twin.deltas[0].hparams, "seed": 1}  # another patch, the same key
    with pytest.raises(MergeError, match=r"ill-conditioned \(condition number"):
        merge_patches([parts[0], twin])


def test_joint_solve_reports_the_condition_number():
    g = torch.Generator().manual_seed(0)
    U, K, R = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, 5, generator=g)
    solved = joint_solve(U, K, R, max_condition=None)
    assert torch.allclose((U.double() @ K.double().T).T @ solved.values.double(), R.double(), atol=1e-5)
    with pytest.raises(
        MergeError, match="9 edits of one matrix with 8 inputs cannot each get their own target"
    ):
        joint_solve(torch.randn(9, 8), torch.randn(9, 8), torch.randn(9, 5), max_condition=None)
    K2 = K.clone()
    K2[2] = K2[1] * (1 + 1e-9)
    with pytest.raises(MergeError, match="condition number"):
        joint_solve(U, K2, R, max_condition=1e4)


def test_keys_round_trip_and_older_files_load(text_file, tmp_path):
    ed = _editor("llama", text_file)
    p = ed.patch([REQ])
    back = load_patch(p.save(tmp_path / "k.safetensors"))
    assert back.id == p.id and torch.equal(back.deltas[0].key, p.deltas[0].key)
    assert back.format_version == "1.3" and back.summary()["edits"][0]["key"] is True
    keyless = new_patch([dataclasses.replace(p.deltas[0], key=None)], base=p.base, parameters=p.parameters)
    keyless.format_version = "1.1"
    older = load_patch(keyless.save(tmp_path / "old.safetensors"))
    assert older.deltas[0].key is None and older.format_version == "1.1"
    with pytest.raises(MergeError, match="format 1.1"):
        merge_patches([older, p])


def test_protect_principal_needs_statistics(text_file):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    hp = dataclasses.replace(FAST, mom2_adjustment=False, protect=True, protect_principal=2)
    with pytest.raises(RequestError, match="protect_principal needs second-moment statistics"):
        Editor(model, tok, hparams=hp).patch([REQ])


def test_protection_refuses_applied_patches_without_keys(text_file):
    ed = _editor("llama", text_file, protect=True, protect_principal=0)
    first = ed.patch([REQS[0]])
    keyless = new_patch(
        [dataclasses.replace(first.deltas[0], key=None)], base=first.base, parameters=first.parameters
    )
    with (
        patched(ed.model, keyless),
        pytest.raises(RequestError, match=r"delta 0 has no key .*protection needs the keys"),
    ):
        ed.patch([REQS[1]])


def test_batched_values_equal_one_by_one_and_drop_finished_rows(text_file, monkeypatch):
    """compute_values on several requests gives each δ what it gets alone, also after finished
    requests' rows leave the replay (the edits stop at different steps here)."""
    import rompatch.rome as rome

    ed = _editor("llama", text_file, v_steps=40, early_stop_loss=3.0)
    singles = [ed._results([r])[0] for r in REQS]
    builds = []
    real = rome._Rows.of
    monkeypatch.setattr(
        rome._Rows, "of", classmethod(lambda cls, *a, **k: builds.append(len(a[6])) or real(*a, **k))
    )
    batched = ed._results(REQS)
    assert len({r.metrics["v_steps_run"] for r in batched}) > 1, "the requests stop at different steps"
    assert builds[0] == len(REQS) and len(builds) > 1 and builds[-1] < len(REQS), builds
    for a, b in zip(singles, batched):
        assert a.metrics["v_steps_run"] == b.metrics["v_steps_run"]
        assert _rel(b.v.double(), a.v.double()) < 1e-4
