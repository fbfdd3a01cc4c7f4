"""The paired statistics and the decision rule (study/protocol.py): the class-stratified bootstrap, paired
intervals with a known difference, Holm's adjustment, and the rule for ties and val noise."""
import numpy as np
import pytest

from study.protocol import (
    Boot,
    Candidate,
    Part,
    best_then_cheapest,
    choose_trial,
    class_stratified,
    decide,
    holm,
    paired_parts,
)


def _ids(n: int, prefix: str = "i") -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


def test_the_stratified_bootstrap_keeps_every_class_in_every_resample():
    """Class 3 holds one test image, always wrong; the others 100 images each, always right. A resample that lost
    class 3 (an image bootstrap does, in about 37% of resamples) would score 1.0; stratified, every resample holds
    one class-3 image and scores exactly 0.75."""
    labels = np.array([0] * 100 + [1] * 100 + [2] * 100 + [3])
    values = np.r_[np.ones(300), 0.0]
    boot = class_stratified([Part(ids=_ids(301), labels=labels, values=values)], n_boot=2000, seed=0)
    assert boot.observed == 0.75
    assert np.all(boot.draws == 0.75)
    # The same data resampled over images ignoring class does lose class 3 in some resamples.
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 301, size=(200, 301))
    assert np.any([3 not in labels[p] for p in picks])


def test_a_class_keeps_its_size_so_its_accuracy_moves_in_steps_of_one_image():
    labels = np.array([0, 0, 1, 1, 1, 1])
    values = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # class 0 at 1/2, class 1 at 4/4
    boot = class_stratified([Part(ids=_ids(6), labels=labels, values=values)], n_boot=3000, seed=1)
    # Class 0 resampled with its two images: 0, 1/2 or 1; class 1 always 1; the mean over the two classes:
    assert set(np.round(boot.draws, 12)) == {0.5, 0.75, 1.0}
    assert np.mean(boot.draws == 0.75) == pytest.approx(0.5, abs=0.05)  # P(one right of two) = 1/2


def test_a_paired_interval_finds_a_constructed_difference():
    """A is right on every image; B is wrong on exactly 10% of each class: the paired difference of mean per-class
    accuracy is exactly 0.10; the interval holds it and excludes 0."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    ids = _ids(400)
    pred_a = labels.copy()
    pred_b = labels.copy()
    for c in range(4):
        wrong = rng.choice(np.flatnonzero(labels == c), size=10, replace=False)
        pred_b[wrong] = (c + 1) % 4
    by_id = dict(zip(ids, labels.tolist()))
    parts = paired_parts({0: (ids, pred_a.tolist())}, {0: (ids, pred_b.tolist())}, by_id)
    boot = class_stratified(parts, n_boot=2000, seed=0)
    lo, hi = boot.interval()
    assert boot.observed == pytest.approx(0.10)
    assert 0 < lo < 0.10 < hi
    assert boot.p_value == pytest.approx(2 / 2001)  # no resample reaches 0: the smallest p the draws can give
    # Reversed, the same interval mirrored.
    back = class_stratified(paired_parts({0: (ids, pred_b.tolist())}, {0: (ids, pred_a.tolist())}, by_id),
                            n_boot=2000, seed=0)
    assert back.observed == pytest.approx(-0.10) and back.interval()[1] < 0


def test_paired_intervals_cover_a_known_difference_about_95_percent_of_the_time():
    """Test sets drawn again and again from a known population (per class, A right with p_a and B with p_b,
    correlated through a shared difficulty): the 95% interval holds the true difference of mean per-class
    accuracy in about 95% of the draws."""
    rng = np.random.default_rng(7)
    p_a, p_b, n_per = np.array([0.9, 0.8, 0.7, 0.95]), np.array([0.85, 0.8, 0.6, 0.9]), 60
    truth = float(np.mean(p_a - p_b))
    labels = np.repeat(np.arange(4), n_per)
    ids = _ids(len(labels))
    covered = 0
    reps = 200
    for rep in range(reps):
        u = rng.random(len(labels))  # a shared difficulty: the models err on the same hard images more often
        v = np.where(rng.random(len(labels)) < 0.7, u, rng.random(len(labels)))  # B shares it on 70% of images
        a, b = (u < p_a[labels]).astype(float), (v < p_b[labels]).astype(float)
        boot = class_stratified([Part(ids=ids, labels=labels, values=a - b)], n_boot=400, seed=rep)
        lo, hi = boot.interval()
        covered += lo <= truth <= hi
    assert 0.89 <= covered / reps <= 0.99


def test_images_shared_by_split_seeds_are_resampled_once():
    """Two parts holding the same images with the same values: each resample weights them identically in both, so
    the mean over the parts varies exactly as one part does (independent resampling would halve its variance)."""
    labels = np.repeat(np.arange(3), 20)
    values = np.random.default_rng(0).integers(0, 2, 60).astype(float)
    one = Part(ids=_ids(60), labels=labels, values=values)
    single = class_stratified([one], n_boot=500, seed=3)
    double = class_stratified([one, one], n_boot=500, seed=3)
    np.testing.assert_allclose(double.draws, single.draws)


def test_an_image_only_one_split_seed_holds_still_varies_with_its_class():
    """Split seeds whose val sets overlap partly: image a is in seed 0's val only, b and c in both, d in seed 1's
    only. The two candidates differ on a alone. Resampled within the class, a is left out of some resamples, so
    the interval of the difference reaches 0 (strata of class x seeds would hold a alone: no variation at all)."""
    labels = np.zeros(3, dtype=np.int64)
    seed0 = Part(ids=["a", "b", "c"], labels=labels, values=np.array([1.0, 0.0, 0.0]))
    seed1 = Part(ids=["b", "c", "d"], labels=labels, values=np.zeros(3))
    boot = class_stratified([seed0, seed1], n_boot=2000, seed=0)
    assert boot.observed == pytest.approx(1 / 6)  # seed 0: 1/3 of its class; seed 1: 0
    lo, hi = boot.interval()
    assert lo == 0.0 and hi >= 0.25 and np.std(boot.draws) > 0


def test_split_seeds_sharing_no_image_keep_each_seeds_own_class_accuracies():
    """Three split seeds with disjoint images, every class constant within each seed: whatever the resample, each
    seed's class accuracies are its own (a class is scored over the images that seed drew, not divided by a fixed
    class size), so every draw equals the observed value."""
    labels = np.repeat(np.arange(3), 30)
    parts = [Part(ids=[f"s{s}-{i}" for i in range(90)], labels=labels,
                  values=np.repeat([1.0, 0.0, 0.5 * s], 30)) for s in range(3)]
    boot = class_stratified(parts, n_boot=500, seed=4)
    assert boot.observed == pytest.approx(np.mean([(1 + 0 + 0.5 * s) / 3 for s in range(3)]))
    np.testing.assert_allclose(boot.draws, boot.observed)


def test_a_seed_that_drew_no_image_sits_the_resample_out():
    """Seed 1 holds one image of three; in a resample that misses it, seed 1 is not scored 0 but left out."""
    a = Part(ids=["a", "b", "c"], labels=np.zeros(3, dtype=np.int64), values=np.ones(3))
    b = Part(ids=["a"], labels=np.zeros(1, dtype=np.int64), values=np.ones(1))
    boot = class_stratified([a, b], n_boot=2000, seed=5)
    np.testing.assert_allclose(boot.draws, 1.0)


def test_an_image_with_two_labels_is_refused():
    with pytest.raises(ValueError, match="two labels"):
        class_stratified([Part(ids=["a"], labels=np.array([0]), values=np.array([1.0])),
                          Part(ids=["a"], labels=np.array([1]), values=np.array([1.0]))], n_boot=10, seed=0)


def test_holm_on_known_p_values():
    # Sorted: .005 x4 = .02, .01 x3 = .03, .03 x2 = .06, .04 x1 = .04 -> kept monotone: .06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5]
    assert holm([0.3, 0.4, 0.9]) == pytest.approx([0.9, 0.9, 0.9])  # capped at 1, never below an earlier step
    assert holm([]) == []


def test_the_bootstrap_p_value_never_reaches_zero_and_is_one_at_no_difference():
    assert Boot(observed=0.1, draws=np.full(999, 0.1)).p_value == pytest.approx(2 / 1000)
    assert Boot(observed=0.0, draws=np.zeros(999)).p_value == 1.0
    assert Boot(observed=0.0, draws=np.r_[-np.ones(500), np.ones(500)]).p_value == 1.0


# ---------------------------------------------------------------------------------------------- the decision


LABELS = np.repeat(np.arange(4), 50)  # val: 4 classes x 50 images
VAL_IDS = _ids(200, "v")
BY_ID = dict(zip(VAL_IDS, LABELS.tolist()))


def _val(n_wrong: int, *, offset: int = 0) -> dict:
    """Val predictions wrong on ``n_wrong`` images (spread over the classes, starting at image ``offset``)."""
    pred = LABELS.copy()
    wrong = (np.arange(n_wrong) * 50 + offset) % 200 + (np.arange(n_wrong) * 50 + offset) // 200
    pred[wrong] = (LABELS[wrong] + 1) % 4
    return {0: (VAL_IDS, pred.tolist())}


def _candidate(name: str, n_wrong: int, cost: float, *, offset: int = 0) -> Candidate:
    val = _val(n_wrong, offset=offset)
    pred = np.array(val[0][1])
    score = float(np.mean([(pred[LABELS == c] == c).mean() for c in range(4)]))
    return Candidate(name=name, val=val, val_score=score, cost_s=cost, infer_s=0.001)


def test_a_cheaper_candidate_within_val_noise_wins():
    """The val-best is one val image ahead of a candidate 100x cheaper: within val noise, the cheaper is used."""
    best, cheap = _candidate("fine-tune", 2, 1000.0), _candidate("head", 3, 10.0)
    d = decide([best, cheap], labels_by_id=BY_ID, n_boot=1000)
    assert (d.val_best, d.chosen, d.runner_up) == (0, 1, 0)
    diff, lo, hi = d.noise[1]
    assert diff == pytest.approx(0.005) and lo <= 0 <= hi
    assert d.within == (0, 1) and d.ties == () and not d.saturated


def test_a_cheaper_candidate_outside_val_noise_does_not_win():
    """Forty val images behind: the interval of the val-best's lead excludes 0, so the val-best is used."""
    best, cheap = _candidate("fine-tune", 2, 1000.0), _candidate("head", 42, 10.0)
    d = decide([best, cheap], labels_by_id=BY_ID, n_boot=1000)
    assert d.chosen == 0 and d.runner_up == 1 and d.noise[1][1] > 0 and d.within == (0,)


def test_exact_val_ties_are_ties_settled_by_cost_not_by_order_or_log_loss():
    """Three candidates with the same val score (different images wrong): a tie, reported as one; the cheapest is
    used whatever the order. Candidates carry no log-loss: the rule cannot read one."""
    a, b, c = (_candidate("a", 4, 30.0, offset=0), _candidate("b", 4, 5.0, offset=7),
               _candidate("c", 4, 20.0, offset=13))
    d = decide([a, b, c], labels_by_id=BY_ID, n_boot=500)
    assert d.chosen == 1 and d.val_best == 1  # the val-best of a tie is its cheapest
    assert set(d.ties) == {0, 2}
    assert decide([c, a, b], labels_by_id=BY_ID, n_boot=500).chosen == 2  # the same candidate, wherever it stands


def test_a_saturated_val_is_said_and_decided_by_cost():
    """Every candidate at 100% on val: saturated; the cheapest is used, and every other one is a tie."""
    cands = [_candidate("knn", 0, 3.0), _candidate("lr", 0, 1.0), _candidate("svm", 0, 2.0)]
    d = decide(cands, labels_by_id=BY_ID, n_boot=200)
    assert d.saturated and d.chosen == 1 and set(d.ties) == {0, 2}
    assert d.noise[0] == (0.0, 0.0, 0.0)  # identical val predictions: no difference in any resample


def test_candidates_without_val_predictions_fall_back_to_exact_ties():
    plain = [Candidate(name="a", val_score=0.95, cost_s=100.0), Candidate(name="b", val_score=0.94, cost_s=1.0),
             Candidate(name="c", val_score=0.95, cost_s=50.0)]
    d = decide(plain, labels_by_id=BY_ID)
    assert not d.measured and d.noise == {} and d.chosen == 2 and d.ties == (0,)


def test_over_split_seeds_the_decision_reads_every_seed():
    """Seed 0 alone puts A ahead by 20 images; over two seeds where B is ahead on seed 1 by as much, they are
    level and the cheaper B is used."""
    a = Candidate(name="a", val={0: _val(0)[0], 1: _val(20)[0]}, val_score=0.95, cost_s=100.0)
    b = Candidate(name="b", val={0: _val(20)[0], 1: _val(0)[0]}, val_score=0.95, cost_s=10.0)
    d = decide([a, b], labels_by_id=BY_ID, n_boot=500)
    assert d.n_seeds == 2 and d.chosen == 1 and d.noise[0][0] == pytest.approx(0.0)


def test_within_a_search_an_exact_tie_goes_to_the_earlier_trial_whatever_its_seconds():
    from types import SimpleNamespace as T
    trials = [T(val=0.8, seconds=1.0, number=0), T(val=0.9, seconds=5.0, number=1), T(val=0.9, seconds=2.0, number=2)]
    assert choose_trial(trials) == 1  # wall seconds differ from run to run; the choice must not
    assert choose_trial(trials[::-1]) == 1  # by trial number, not by position
    assert best_then_cheapest([0.8, None, 0.8], [3.0, 1.0, 2.0]) == 2  # no val score counts as the worst
