"""The neighbours default rule (bench_counterfact.DEFAULT_RULE) and the defaults it decides
(rompatch.arch.NEIGHBOUR_DEFAULTS): the verdict's arithmetic, and that every complete neighbours run
in bench/results agrees with the default the code ships."""

from __future__ import annotations

import pytest

from bench import bench_counterfact as bc
from rompatch.arch import default_neighbours


def _case(
    es: float, ps: float, ns: float, pre_ns: float = 0.7, ratio: float = 0.5, p_new: float = 0.9
) -> dict:
    edit = {"update_spectral_norm": ratio * 2.0, "weight_spectral_norm": 2.0, "p_new_after": p_new}
    return {"post": {"ES": es, "PS": ps, "NS": ns}, "pre": {"NS": pre_ns}, "edit": edit}


def _runs(nb: list[tuple], plain: list[tuple]) -> dict[str, dict[int, dict]]:
    return {
        "L4-nb64": {i: _case(*x) for i, x in enumerate(nb)},
        "L4": {i: _case(*x) for i, x in enumerate(plain)},
    }


def test_the_rule_holds_when_ns_gains_a_point_and_es_ps_hold():
    runs = _runs([(1, 1, 0.70), (1, 0.99, 0.62)], [(1, 1, 0.68), (1, 0.995, 0.60)])
    gain, n, holds = bc.rule_check(runs["L4-nb64"], runs["L4"])
    assert n == 2 and holds
    assert gain["NS"] == pytest.approx(2.0) and gain["PS"] == pytest.approx(-0.25) and gain["ES"] == 0
    (line,) = bc.default_rule(runs, total=2)[1:]  # no edit at the cap: no split
    assert "holds on all 2 records: on by default" in line
    # the levels before and after, beside the changes (the comparison table covers only the records
    # every run holds)
    assert (
        "on their 2 common records: ES 100.0 → 100.0, PS 99.8 → 99.5, NS 64.0 → 66.0 (unedited NS 70.0)"
        in line
    )


def test_the_changes_are_split_between_edits_at_the_cap_and_the_rest():
    # record 0 ends at the cap with neighbours and carries the whole NS gain and PS loss
    runs = _runs([(1, 0.9, 0.8, 0.7, 1.0), (1, 1, 0.6)], [(1, 1, 0.6), (1, 1, 0.6)])
    assert bc.at_size_cap(runs["L4-nb64"][0]) and not bc.at_size_cap(runs["L4-nb64"][1])
    line, split, _ = bc.default_rule(runs, total=2)[1:]
    assert "NS +10.0, ES +0.0, PS -5.0 points" in line
    assert split.strip() == (
        "Of these changes, the 1 edits whose update ends at the size cap with neighbours bring "
        "NS +10.0, ES +0.0, PS -5.0 points; the other 1, the rest."
    )


def test_the_let_go_estimate_takes_the_plain_edit_below_the_threshold_at_the_cap_only():
    nb = [
        (1, 0.9, 0.8, 0.7, 1.0, 0.6),  # at the cap, P(target) 0.6: replaced from t = 0.7 up
        (1, 0.95, 0.7, 0.7, 1.0, 0.95),  # at the cap, P(target) 0.95: replaced only at t = 1
        (1, 0.5, 0.9, 0.7, 0.5, 0.1),  # not at the cap: never replaced
    ]
    runs = _runs(nb, [(1, 1, 0.6), (1, 1, 0.6), (1, 1, 0.6)])
    est = {t: (k, g) for t, k, g, _ in bc.let_go_estimate(runs["L4-nb64"], runs["L4"], (0.5, 0.7, 1.0))}
    assert est[0.5][0] == 0 and est[0.5][1]["PS"] == pytest.approx(-100 * 0.65 / 3)
    assert est[0.7][0] == 1 and est[0.7][1]["PS"] == pytest.approx(-100 * 0.55 / 3)
    assert est[0.7][1]["NS"] == pytest.approx(100 * 0.4 / 3)
    assert est[1.0][0] == 2 and est[1.0][1]["PS"] == pytest.approx(-100 * 0.5 / 3)
    assert est[1.0][1]["NS"] == pytest.approx(100 * 0.3 / 3)


@pytest.mark.parametrize(
    "nb, plain",
    [
        ([(1, 1, 0.605)], [(1, 1, 0.60)]),  # NS +0.5: not enough
        ([(1, 0.99, 0.70)], [(1, 1, 0.60)]),  # PS -1
        ([(0.99, 1, 0.70)], [(1, 1, 0.60)]),  # ES -1
    ],
)
def test_the_rule_fails_on_too_little_gain_or_a_loss(nb, plain):
    runs = _runs(nb, plain)
    assert not bc.rule_check(runs["L4-nb64"], runs["L4"])[2]
    assert "does not hold on all 1 records: off by default" in bc.default_rule(runs, total=1)[1]


def test_a_partial_run_decides_nothing():
    runs = _runs([(1, 1, 0.9)], [(1, 1, 0.6), (1, 1, 0.6)])
    assert "holds so far, on 1 of 3 records; the full run decides" in bc.default_rule(runs, total=3)[1]


# The embedded models' shapes (what NEIGHBOUR_DEFAULTS is keyed by), without loading their weights.
SHAPES = {
    "smollm2-135m": ("LlamaConfig", 30, 576),
    "gemma3-270m": ("Gemma3TextConfig", 18, 640),
}


@pytest.mark.parametrize("model", sorted(SHAPES))
def test_shipped_neighbour_defaults_follow_the_complete_runs(model):
    """Where a neighbours run covers every shared CounterFact record, the model's default is that
    run's N if the rule holds and 0 if it does not; partial runs decide nothing."""
    import transformers

    from bench.data import data_file, missing_data
    from rompatch.evaluation.evaluate import load_counterfact

    if missing_data("counterfact/counterfact_subset.json"):
        pytest.skip("needs $ROMPATCH_DATA (CounterFact): the rule is over all of its records")
    total = len(load_counterfact(str(data_file("counterfact/counterfact_subset.json"))))
    cls, layers, hidden = SHAPES[model]
    config = getattr(transformers, cls)(num_hidden_layers=layers, hidden_size=hidden)
    runs = bc.read_runs(model)
    complete = []
    for name, plain, n in bc.neighbour_runs(runs):
        _, records, holds = bc.rule_check(runs[name], runs[plain])
        if records >= total:
            complete.append((n, holds))
    if not complete:
        pytest.skip(f"no neighbours run of {model} covers all {total} records yet")
    for n, holds in complete:
        assert (default_neighbours(config) == n) == holds, (model, n, holds)
