"""Chat judgements become preference pairs, kept in the workspace and saved as immutable dataset versions."""

from __future__ import annotations

import pytest

from studio.data.errors import DataError
from studio.data.registry import DatasetRegistry
from studio.services.feedback import FeedbackLog, Judgement, Verdict, save_version, tally

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Mascot?"}]


def judged(verdict: Verdict, a="base", b="r1", a_text="An otter.", b_text="Ripple, a purple otter.", edited=""):
    return Judgement(PROMPT, a, b, a_text, b_text, verdict, edited)


def test_a_judgement_gives_the_better_answer_over_the_other():
    pair = judged(Verdict.B).pair()
    assert (pair.chosen, pair.rejected) == ("Ripple, a purple otter.", "An otter.")
    assert [(m.role, m.content) for m in pair.prompt] == [("system", "Be brief."), ("user", "Mascot?")]
    assert judged(Verdict.A, edited="Ripple here! A purple otter.").pair().chosen == "Ripple here! A purple otter."
    assert judged(Verdict.TIE).pair() is None
    assert judged(Verdict.A, b_text="An otter. ").pair() is None  # the same answer twice is no preference


def test_the_tally_counts_each_model_whichever_side_it_was_shown_on():
    judgements = [
        judged(Verdict.B),  # r1 shown as B wins
        judged(Verdict.A, a="r1", b="base"),  # r1 shown as A wins
        judged(Verdict.A),  # base wins
        judged(Verdict.TIE, a="r1", b="base"),
        judged(Verdict.A, a="r1", b="r2"),  # another pairing
    ]
    first, second = tally(judgements)
    assert (first.a_model, first.b_model, first.a_wins, first.b_wins, first.ties) == ("base", "r1", 1, 2, 1)
    assert first.win_rate("r1") == pytest.approx((2 + 0.5) / 4) and first.win_rate("base") == pytest.approx(0.375)
    assert (second.a_model, second.a_wins, second.total) == ("r1", 1, 1)


def test_saving_registers_a_new_preference_version_each_time(tmp_path):
    registry = DatasetRegistry(tmp_path)
    log = FeedbackLog(tmp_path, "chat-feedback")
    with pytest.raises(DataError, match="No preference pairs to save yet"):
        save_version(registry, log)
    log.add(judged(Verdict.B))
    log.add(judged(Verdict.TIE))
    assert [j.verdict for j in FeedbackLog(tmp_path, "chat-feedback").judgements()] == [Verdict.B, Verdict.TIE]
    first = save_version(registry, log)
    assert (first.name, first.format, first.rows) == ("chat-feedback-v1", "preference", 1)
    log.add(judged(Verdict.A, a_text="Ripple!", b_text="No idea."))
    second = save_version(registry, log)
    assert (second.name, second.rows) == ("chat-feedback-v2", 2)
    # v1 is unchanged: a run trained on it stays reproducible.
    assert len(registry.load_preference("chat-feedback-v1")) == 1
    pairs = registry.load_preference("chat-feedback-v2")
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("Ripple, a purple otter.", "An otter."),
        ("Ripple!", "No idea."),
    ]
    assert pairs[0].prompt[0].content == "Be brief."
    with pytest.raises(DataError, match="name"):
        FeedbackLog(tmp_path, "../escape")
