"""A job's progress bar only moves forward: one overall fraction across its stages."""

from __future__ import annotations

from tailor_ui.control import SCALE, Stages, forward_only
from tailor_ui.app.jobs import DONE, JobRunner


def test_a_stage_that_starts_its_count_again_does_not_move_the_bar_back():
    events = []
    report = forward_only(lambda *e: events.append(e))
    report("merging", 9, 10)
    report("quick check", 0, 1)  # a new stage counting from 0
    report("quick check", 1, 1)
    assert events == [("merging", 9, 10), ("quick check", SCALE * 9 // 10, SCALE), ("quick check", 1, 1)]


def test_stages_fill_their_shares_of_one_fraction_and_say_their_own_progress():
    events = []
    stages = Stages(lambda *e: events.append(e), [1, 3])
    first, second = stages.stage(0), stages.stage(1, "[2/2] ")
    first("loading", 1, 2)
    first("loading", 2, 2)
    second("merging", 0, 4)
    second("merging", 2, 4)
    assert [done / total for _, done, total in events] == [0.125, 0.25, 0.25, 0.625]
    assert events[-1][0] == "[2/2] merging (50% of this step)"
    first("loading", 0, 2)  # a late report of an earlier stage holds the bar where it is
    assert events[-1][1] / events[-1][2] == 0.625


def test_a_job_whose_stages_restart_reports_a_fraction_that_never_falls():
    runner = JobRunner()
    seen = []

    def job(progress, _stop):
        for stage, steps in (("collecting", 4), ("tailoring", 8), ("quick check", 1)):
            for i in range(steps):
                progress(stage, i, steps)
                seen.append(runner.get(handle.id, "me").fraction)
        return "ok"

    handle = runner.submit("me", "tailor", job)
    assert runner.wait(handle.id, "me", 10).status == DONE
    assert seen == sorted(seen) and seen[-1] >= 7 / 8
    runner.shutdown()


def test_a_sweeps_label_states_the_examples_its_sets_hold():
    from tailor_ui.data import Example
    from tailor_ui.evaluation.evaluate import EvalSet
    from tailor_ui.app.service.sweep import SweepPlan

    def made(name: str, n: int) -> EvalSet:
        return EvalSet(name, "vqa", [Example("a.png", "q?", ("a",))] * n)

    plan = SweepPlan(grid=[object()] * 3, original=[made("o", 6)], target=[made("t", 6)], n=150,
                     trained=[], calibration=None)
    assert plan.label == "sweep: 3 settings x 2 sets x 6 examples"
    plan.target = [made("t", 4)]
    assert plan.label == "sweep: 3 settings x 2 sets x 4–6 examples"
