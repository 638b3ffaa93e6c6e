"""lessons/ANSWERS.md cannot go stale silently: its numbers from runs are tagged, each tag
names a measure of lessons/answers.py, and lesson commands run here must give them back
within the tolerance a class's machines may differ by. Lesson 1 runs in every test run
(one 300-step run); the others with --run-slow."""

import os
import sys

import pytest

from forkrun import REPO

sys.path.insert(0, os.path.join(REPO, 'lessons'))
import answers  # noqa: E402  (lessons/ is not a package)


def test_every_tagged_number_is_measured_and_every_measure_is_in_the_answers():
    texts = answers.read_files()
    in_answers = answers.tagged_numbers(texts[answers.ANSWERS])  # raises on a tag without a measure
    assert {name for name, _ in in_answers} == set(answers.MEASURES)
    for path, text in texts.items():  # the lessons' "what you should see" may repeat some
        assert {name for name, _ in answers.tagged_numbers(text, path)} <= set(answers.MEASURES)
        # a tag not right after its number (a space between, a typo) would never be checked
        assert '<!-- l' not in answers.TAG.sub('', text), path


def test_tags_read_and_write_by_hand():
    text = "loss 2.0465<!-- l1.val_loss --> and 94<!-- l1.top_share.arithmetic -->% and 0.092-0.178<!-- l1.load0_max.layer0 -->"
    assert answers.tagged_numbers(text) == [('l1.val_loss', '2.0465'), ('l1.top_share.arithmetic', '94'),
                                            ('l1.load0_max.layer0', '0.178')]  # the '-' of a range is not a sign
    assert answers.value_and_rounding('94') == (94.0, 0.5) and answers.value_and_rounding('1,024.5') == (1024.5, 0.05)
    # rewritten at the decimals each had: 2.04851 -> 2.0485, 93.7 -> 94, 0.17753 -> 0.178
    measured = {'l1.val_loss': 2.04851, 'l1.top_share.arithmetic': 93.7, 'l1.load0_max.layer0': 0.17753}
    assert answers.write_numbers(text, measured) == \
        "loss 2.0485<!-- l1.val_loss --> and 94<!-- l1.top_share.arithmetic -->% and 0.092-0.178<!-- l1.load0_max.layer0 -->"
    # a number quoted twice is checked twice: here the second is off
    rows = answers.differences({'l1.val_loss': 2.0}, {answers.ANSWERS: "2.0<!-- l1.val_loss --> 2.1<!-- l1.val_loss -->"})
    assert [row[-1] for row in rows] == [True, False]
    with pytest.raises(ValueError, match='does not measure'):
        answers.tagged_numbers("1.0<!-- l1.no_such_number -->")


def test_tolerances_by_hand():
    # val loss: 0.025 whatever the value; max_vio ('balance'): 20% of the value, at least 0.02
    assert answers.MEASURES['l1.val_loss'].tolerance(2.05) == 0.025
    assert answers.MEASURES['l2.max_vio.noaux'].tolerance(4.8) == pytest.approx(0.96)
    assert answers.MEASURES['l3.max_vio.aux_free'].tolerance(0.095) == 0.02
    # within 0.025 + 0.00005 (half a unit of the 4th decimal, the written number's rounding)
    rows = answers.differences({'l1.val_loss': 2.07155}, {answers.ANSWERS: "2.0465<!-- l1.val_loss -->"})
    assert rows == [('lessons/ANSWERS.md', 'l1.val_loss', 2.0465, 2.07155, 0.025, True)]
    rows = answers.differences({'l1.val_loss': 2.07156}, {answers.ANSWERS: "2.0465<!-- l1.val_loss -->"})
    assert rows[0][-1] is False


def check_lessons(lessons, runs_dir):
    # one thread per run, as the tolerances were measured (a class's machines may differ more)
    answers.run_lessons(lessons, str(runs_dir), env={**os.environ, 'OMP_NUM_THREADS': '1'})
    rows = answers.differences(answers.measure(lessons, str(runs_dir)), answers.read_files())
    off = [f"{where} {name}: written {written}, measured {value:.4f} (tolerance {tolerance:.4f})"
           for where, name, written, value, tolerance, within in rows if not within]
    assert not off, "the lessons give other numbers now; reread these answers, then python lessons/answers.py " \
                    "--write:\n" + '\n'.join(off)
    assert {row[1] for row in rows} == {name for name, m in answers.MEASURES.items() if m.lesson in lessons}


def test_lesson_1_gives_the_numbers_of_its_answers(tmp_path):
    check_lessons([1], tmp_path)


@pytest.mark.slow
def test_the_other_lessons_give_the_numbers_of_their_answers(tmp_path):
    check_lessons([lesson for lesson in answers.CONFIGS if lesson != 1], tmp_path)
