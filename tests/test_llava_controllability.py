"""The controllability benchmark's paired error on the adversarial POPE F1 gap between two plans, and the
spread of its Spearman over draws of the probes."""
import pytest

from benchmarks.llava_controllability import agreement, f1_gap, spearman_spread
from hipp.data.instruct import make_samples
from hipp.evaluation.answers import pope_script_reading, score
from hipp.evaluation.generative_bench import Answers


def test_the_gap_is_the_f1_difference_and_its_error_is_zero_only_for_the_same_answers():
    samples = make_samples("val", 40, seed=0, kinds=("pope/adversarial",))
    truth = [s.answer for s in samples]
    yes = ["yes"] * len(samples)  # says yes to everything: recall 1, precision 1/2
    assert f1_gap(Answers(samples, truth), Answers(samples, truth)) == (0.0, 0.0)
    gap, se = f1_gap(Answers(samples, truth), Answers(samples, yes))
    assert gap == 1.0 - score(samples, yes)["pope/adversarial_f1"] and abs(gap - (1 - 2 / 3)) < 1e-9
    assert 0.0 < se < gap


def test_agreement_counts_the_teachers_answers_kept_and_those_of_them_that_are_right():
    samples = make_samples("val", 40, seed=0, kinds=("pope/adversarial",))
    truth = [s.answer for s in samples]
    teacher = ["yes"] * len(samples)  # right on the half whose answer is yes
    close = [i < 10 for i in range(len(samples))]  # the first ten: five yes, five no
    assert agreement(teacher, Answers(samples, truth), close) == {
        "adversarial_as_teacher": truth.count("yes"), "adversarial_as_teacher_right": truth.count("yes"),
        "adversarial_neither_yes_nor_no": 0, "adversarial_false_yes": 0, "adversarial_missed_yes": 0,
        "adversarial_lost_on_close_calls": 5}
    assert agreement(teacher, Answers(samples, ["Yes."] * len(samples))) == {
        "adversarial_as_teacher": len(samples), "adversarial_as_teacher_right": truth.count("yes"),
        "adversarial_neither_yes_nor_no": 0, "adversarial_false_yes": truth.count("no"), "adversarial_missed_yes": 0}
    stray = agreement(teacher, Answers(samples, ["a red circle"] * len(samples)))
    assert stray["adversarial_neither_yes_nor_no"] == 40 and stray["adversarial_missed_yes"] == truth.count("yes")
    # POPE's script reads a non-answer as yes: the stray answers score as saying yes to everything
    stray_f1 = score(samples, ["a red circle"] * len(samples))["pope/adversarial_f1_pope_script"]
    assert stray_f1 == score(samples, ["yes"] * len(samples))["pope/adversarial_f1"] > 0.5
    assert 0 < truth.count("yes") < len(samples)


def test_the_spearmans_spread_is_nil_for_plans_far_apart_and_wide_for_plans_a_probe_apart():
    samples = make_samples("val", 200, seed=0, kinds=("pope/adversarial",))
    truth = [s.answer for s in samples]
    flip = {"yes": "no", "no": "yes"}

    def wrong_on(k):  # right but for the first k probes
        return Answers(samples, [flip[t] if i < k else t for i, t in enumerate(truth)])
    apart = spearman_spread([0, 0.5, 1], [wrong_on(80), wrong_on(40), wrong_on(0)], count=200)
    assert apart["mean"] == pytest.approx(1.0) and apart["p05"] == pytest.approx(1.0) and apart["sd"] < 1e-9
    assert apart["share_at_least_0.8"] == 1.0
    close = spearman_spread([0, 0.5, 1], [wrong_on(2), wrong_on(1), wrong_on(0)], count=200)
    assert close["p05"] < 0.8 and 0.0 < close["share_at_least_0.8"] < 1.0 and close["sd"] > 0.1
    assert close["draws"] == 200


def test_answers_read_as_popes_evaluation_script_reads_them():
    assert [pope_script_reading(t) for t in ("No, there is not.", "There is no dog.", "Not here", "Yes.", "yes, no.",
                                             "a red circle", "Nope", "")] == \
        ["no", "no", "yes", "yes", "no", "yes", "yes", "yes"]  # its words, as written: "Not" is not "not"
