"""A small made-up encyclopaedia: the text-only facts behind the world's T-Locality questions.

Countries with a capital and a language, named from syllables by a fixed RNG (the facts are part of the world,
not of a dataset seed). Questions are asked the way MMEdit's NQ locality records are ("nq question: ...").
"""

from __future__ import annotations

import dataclasses

import numpy as np

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s", "k")
FACTS_SEED = 1234
NUM_COUNTRIES = 24


@dataclasses.dataclass(frozen=True)
class Fact:
    question: str  # as a `loc` field: "nq question: ..."
    answer: str


def word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables))


def encyclopaedia(num_countries: int = NUM_COUNTRIES) -> list[Fact]:
    """Two facts per country (capital, language); names are distinct across the whole encyclopaedia."""
    rng = np.random.default_rng(FACTS_SEED)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = word(rng, syllables)
            if w not in used:
                used.add(w)
                return w

    facts = []
    for _ in range(num_countries):
        country, capital, language = fresh(2), fresh(1), fresh(2) + "ish"
        facts.append(Fact(f"nq question: what is the capital of {country}", capital))
        facts.append(Fact(f"nq question: which language is spoken in {country}", language))
    return facts
