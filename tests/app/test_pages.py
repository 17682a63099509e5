"""How the annotate page renders an answer (app/pages/common.py): long answers fold their rest
under a summary at a paragraph break, never inside a code block, and nothing is cut."""

from app.pages.common import LONG_ANSWER_CHARS, answer_html, split_long


def test_a_short_answer_is_one_card():
    assert split_long("short answer") == ("short answer", "")
    assert "<details" not in answer_html("short answer")


def test_a_long_answer_folds_at_the_first_paragraph_break_past_the_limit():
    paragraphs = [f"Paragraph {i}. " + " ".join(["words"] * 60) for i in range(8)]  # about 370 characters each
    text = "\n\n".join(paragraphs)
    head, rest = split_long(text)
    assert head == "\n\n".join(paragraphs[:4]) and rest == "\n\n".join(paragraphs[4:])  # 4 x 370 > 1200
    assert len(head) >= LONG_ANSWER_CHARS and head + "\n\n" + rest == text  # nothing lost
    html = answer_html(text)
    assert '<details class="rankloop-more"><summary>Show the whole answer (' in html and "Paragraph 7." in html


def test_a_code_block_is_never_split_and_an_answer_without_a_break_stays_whole():
    code = "```\n" + "x = 1\n\n" * 300 + "```"
    head, rest = split_long("Intro.\n\n" + code + "\n\nAfter the code.")
    assert head.endswith("```") and rest == "After the code."
    assert split_long("word " * 1000) == ("word " * 1000, "")
