"""Reading page state from URL query parameters (components/url_state.py)."""

import pytest

from components.url_state import SHORT_LENGTH, QueryReader, as_index, short


def test_short_quotes_text_and_cuts_long_text_with_an_ellipsis():
    assert short("abc") == "'abc'"
    assert short("x" * SHORT_LENGTH) == repr("x" * SHORT_LENGTH)
    cut = short("y" * (SHORT_LENGTH + 10))
    assert cut == repr("y" * (SHORT_LENGTH - 1) + "…")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), ("7", 7), (" 3", 3), (3.0, 3), (-1, None), ("-2", None), ("x", None), (None, None)],
)
def test_as_index_keeps_only_non_negative_whole_numbers(value, expected):
    assert as_index(value) == expected


def test_as_index_rejects_booleans_although_they_are_ints():
    assert as_index(True) is None
    assert as_index(False) is None


def test_text_is_none_for_absent_empty_or_non_string_values():
    read = QueryReader({"empty": "", "number": 3, "list": []})
    assert read.text("missing") is None
    assert read.text("empty") is None
    assert read.text("number") is None
    assert read.messages == []


def test_text_uses_the_first_of_repeated_values_and_says_so():
    read = QueryReader({"model": ["a", "b"]})
    assert read.text("model") == "a"
    assert read.messages == ["the link gives 'model' 2 times; using the first"]


def test_index_reads_whole_numbers_and_defaults_silently_when_absent():
    read = QueryReader({"layer": "2"})
    assert read.index("layer", 0) == 2
    assert read.index("head", 5) == 5
    assert read.index("token") is None
    assert read.messages == []


def test_index_falls_back_with_a_message_naming_the_default():
    read = QueryReader({"layer": "-1", "token": "x"})
    assert read.index("layer", 0) == 0
    assert read.index("token", None) is None
    assert read.messages == [
        "layer '-1' in the link is not a whole number ≥ 0; using 0",
        "token 'x' in the link is not a whole number ≥ 0; using none",
    ]


def test_index_message_can_say_what_happens_instead():
    read = QueryReader({"pos": "two"})
    assert read.index("pos", fallback="ignored") is None
    assert read.messages == ["pos 'two' in the link is not a whole number ≥ 0; ignored"]


@pytest.mark.parametrize("raw", ["+3", " 3", "1_0", "٣"])
def test_index_digits_only_rejects_what_int_would_accept(raw):
    assert QueryReader({"layer": raw}).index("layer", 0) == int(raw)
    strict = QueryReader({"layer": raw})
    assert strict.index("layer", 0, digits_only=True) == 0
    assert len(strict.messages) == 1


def test_choice_keeps_allowed_values_and_replaces_others_with_a_message():
    read = QueryReader({"align": "match", "tab": "nope"})
    assert read.choice("align", ("end", "match"), "end") == "match"
    assert read.choice("tab", ("pair", "set"), "pair") == "pair"
    assert read.choice("missing", ("pair",), "pair") == "pair"
    assert read.messages == ["tab 'nope' in the link is not one of pair, set; using pair"]


def test_choice_message_can_describe_the_problem_and_cuts_long_values():
    long = "z" * 100
    read = QueryReader({"score": long})
    assert read.choice("score", {"induction": 1}, "induction", problem="is unknown") == "induction"
    assert read.messages == [f"score {short(long)} in the link is unknown"]


def test_messages_follow_the_order_values_were_read():
    read = QueryReader({"a": ["1", "2"], "b": "x"})
    read.index("b", 0)
    read.text("a")
    assert [m.split()[0] for m in read.messages] == ["b", "the"]
