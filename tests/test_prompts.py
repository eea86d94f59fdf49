import pytest

from data.prompts import STRATEGIES, derive_prompts, split_sentences

THREE = "The sky is blue. Grass is green.  Snow is white."
S1, S2, S3 = "The sky is blue.", "Grass is green.", "Snow is white."


def test_split_sentences():
    assert split_sentences(THREE) == [S1, S2, S3]
    # abbreviations and times do not end a sentence
    text = "Mr. Smith went to Washington. He arrived at 5 p.m. on Monday."
    assert split_sentences(text) == ["Mr. Smith went to Washington.", "He arrived at 5 p.m. on Monday."]
    assert split_sentences("no final period here") == ["no final period here"]
    assert split_sentences("  \n ") == []
    assert split_sentences("Title line\nA  body   sentence.") == ["Title line", "A body sentence."]


def test_sentences_multi_sentence():
    # 10 words: The sky is blue. Grass is green. Snow is white. -> the last 5 are "is green. Snow is white."
    assert derive_prompts(THREE, 4, "sentences", last_n_words=5) == [S3, S2, S1, "is green. Snow is white."]


def test_sentences_cycle_backwards_when_k_exceeds_sentences():
    # i = 1..5 -> sentences[-1], [-2], [-3], [-4 % 3] = [2], [-5 % 3] = [1]
    assert derive_prompts(THREE, 6, "sentences", last_n_words=3) == [S3, S2, S1, S3, S2, "Snow is white."]


def test_sentences_one_sentence_and_short_text():
    text = " A red apple   on a table "
    # one sentence, fewer than 70 words: every prompt is the whole text with whitespace collapsed
    assert derive_prompts(text, 3, "sentences") == ["A red apple on a table"] * 3


def test_sentences_k1_is_only_the_last_words():
    assert derive_prompts(THREE, 1, "sentences", last_n_words=2) == ["is white."]
    words = [f"w{i}" for i in range(100)]
    assert derive_prompts(" ".join(words) + ".", 1, "sentences") == [" ".join(words[30:]) + "."]


def test_full_and_question():
    assert derive_prompts("What color is a banana? Answer:", 3, "full") == ["What color is a banana? Answer:"] * 3
    assert derive_prompts("Question: Is snow cold? Answer:", 2, "question", question="Is snow cold?") == [
        "Is snow cold?",
        "Is snow cold?",
    ]
    assert STRATEGIES == ("sentences", "full", "question")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text="a.", k=2, strategy="words"), "unknown image prompt strategy 'words'"),
        (dict(text="a.", k=0, strategy="full"), "k must be >= 1"),
        (dict(text="a.", k=2, strategy="question"), "needs the raw question"),
        (dict(text=" ", k=2, strategy="sentences"), "empty text"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        derive_prompts(**kwargs)
