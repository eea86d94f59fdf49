"""Image prompts derived from an input text (docs/method.md, "Image prompts").

Strategies:
- ``sentences``: the released protocol for commonsense QA, BoolQ, SQuAD and QuAC.
  Prompts 1..k-1 are the text's sentences taken backwards from the last one,
  cycling when k-1 exceeds the number of sentences; prompt k is the last
  ``last_n_words`` words of the whole text (70 by default, 60 for BoolQ).
- ``full``: the whole text, k times (ImageNetVC).
- ``question``: the raw question, independent of any prompt template, k times.

Sentence splitting uses pysbd, whose rules ship with the package, so it works
offline (NLTK's punkt needs a data download at run time).
"""

from functools import lru_cache

STRATEGIES = ("sentences", "full", "question")


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """Split English text into sentences, each with its whitespace collapsed to single spaces.

    Line breaks end a sentence (pysbd's rule). Empty text gives [].
    """
    if not text.strip():
        return []
    sentences = (" ".join(s.split()) for s in _segmenter().segment(text))
    return [s for s in sentences if s]


def last_words(text: str, n: int) -> str:
    """The last n whitespace-separated words of text, joined by single spaces."""
    return " ".join(text.split()[-n:])


def derive_prompts(
    text: str,
    k: int,
    strategy: str,
    *,
    last_n_words: int = 70,
    question: str | None = None,
) -> list[str]:
    """Return exactly k image prompts for text under the given strategy (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown image prompt strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if k < 1:
        raise ValueError(f"k must be >= 1 to derive image prompts, got {k}")
    if strategy == "full":
        return [text] * k
    if strategy == "question":
        if question is None:
            raise ValueError("image prompt strategy 'question' needs the raw question (question=...)")
        return [question] * k
    if last_n_words < 1:
        raise ValueError(f"last_n_words must be >= 1, got {last_n_words}")
    sentences = split_sentences(text)
    if not sentences:
        raise ValueError("cannot derive 'sentences' image prompts from an empty text")
    n = len(sentences)
    return [sentences[-i % n] for i in range(1, k)] + [last_words(text, last_n_words)]
