"""A seeded stochastic language with an exact oracle: the suite's embedded default corpus (no download).

Grammar (one sentence; ``[x]`` optional, ``x*`` repeated, probabilities in ``P`` below)::

    S      -> NP<subj> [PREP NP<pp>] [that RC] VP<1> [and VP<2>] [PREP NP<pp>] [ADV] <eos>
    RC     -> NP<rc> [PREP NP<pp>] VT[num(NP<rc>)]   object relative: "the cat that the dogs (near the house) chase"
            | VT[num(subj)] NP<obj> | VI[num(subj)]  subject relative: "the cat that chases the dogs"
    VP<k>  -> VT[num(subj)] NP<obj> | VI[num(subj)] | COP[num(subj)] ADJ
    NP     -> DET[sg|pl|any] ADJ* N[num] | ADJ* N[pl]       (bare plural)

Features carried in the state and the dependencies they create:

    =====================  ===============================================================================
    subject number         every main verb / copula (VP<1>, VP<2>, the subject relative's verb) agrees with
                           it, across PPs, relative clauses and objects (``the cat that the dogs chase was``)
    subject noun class     main verb class P(v | c_subj), predicative adjective class, subject-relative verb
    NP<rc> class + head    object-relative verb class  ~ P(v | c_rc) * P(c_head | v)  (head noun is its object)
    verb class             object noun class P(c | v)                  (selectional preference)
    preposition class      its object's noun class P(c | prep)
    adjective class        following noun class ~ P(c | context) * A[adj, c]  (adjectives prefer some nouns)
    determiner             noun number (a/this -> sg, these/many -> pl, the/my -> either)
    =====================  ===============================================================================

Words are disjoint categories (``N[num,class]``, ``VT[num,class]``, ``VI[num,class]``, ``ADJ[class]``, ``ADV``,
``DET[num]``, ``PREP[class]``, ``COP[num]``, ``that``, ``and``, ``<eos>``), each with Zipfian frequencies over its
words. Content words are pseudo-words built from CV syllables: noun ``bako``/``bakos`` (sg/pl), verb
``dirus``/``diru`` (sg/pl), adjective ``mela``, adverb ``tovily``. ~3000 words in all.

Why the oracle is exact: the generator is a deterministic probabilistic automaton. A state (a small tuple:
grammar position + the features above) has a list of arcs ``(prob, category, next state)`` in which every
category occurs at most once (asserted), and categories are disjoint; a word is emitted by choosing an arc,
then a word of its category. So each word read from a state selects exactly one arc, the state after any
prefix is a function of its words, and ``p(word | prefix) = p(arc) * p(word | category)`` is the generating
probability itself. ``<eos>`` is an arc like any other and resets the state (sentences are independent).

Seeds: ``SyntheticLanguage(seed)`` draws the vocabulary and all distributions from
``default_rng([seed, 0])``; ``write_corpus`` samples train, valid, test (in that order) from one stream
``default_rng([seed, 1])``.
"""

from __future__ import annotations

import math
import pathlib
from bisect import bisect_right
from typing import NamedTuple

import numpy as np

EOS = "<eos>"

# --------------------------------------------------------------------------------------------------------
# Grammar tables
# --------------------------------------------------------------------------------------------------------

N_NOUN_CLASSES, N_TV_CLASSES, N_IV_CLASSES, N_PREP_CLASSES = 10, 8, 4, 4
SIZES = {"N": 90, "VT": 30, "VI": 30, "ADJ": 30, "ADV": 100}  # lemmas per class (ADV: one class)

P = dict(
    bare=0.15,  # NP without determiner (then plural)
    adj=0.4,  # first attributive adjective
    adj2=0.15,  # each further adjective
    subj_pp=0.35,  # PP after the subject noun
    rc=0.6,  # relative clause on the subject
    obj_rel=0.55,  # ... of which object relatives ("that the dogs chase")
    rc_pp=0.25,  # PP after the object relative's subject ("that the dogs near the house chase")
    rc_vt=0.7,  # subject relative: transitive verb (else intransitive)
    vt=0.6,  # VP: transitive verb + object
    vi=0.25,  # VP: intransitive verb (else copula + adjective)
    coord=0.35,  # "and" + second VP after the first
    vp_pp=0.5,  # sentence-final PP
    adv=0.35,  # sentence-final adverb
)
NUM_GIVEN_DET = {"sg": {"sg": 1.0}, "pl": {"pl": 1.0}, "any": {"sg": 0.6, "pl": 0.4}}
P_DET = {"sg": 0.35, "pl": 0.2, "any": 0.45}
FUNCTION_WORDS = {  # category -> words, most frequent first
    ("DET", "sg"): ["a", "this", "each", "every", "one"],
    ("DET", "pl"): ["these", "some", "many", "several", "two", "few", "those"],
    ("DET", "any"): ["the", "my", "his", "her", "our", "their", "no", "its"],
    ("COP", "sg"): ["is", "was"],
    ("COP", "pl"): ["are", "were"],
    ("PREP", 0): ["in", "on", "at", "inside"],
    ("PREP", 1): ["near", "behind", "beside", "around"],
    ("PREP", 2): ["with", "without", "against", "like"],
    ("PREP", 3): ["from", "into", "toward", "across"],
    ("THAT",): ["that"],
    ("AND",): ["and"],
    ("EOS",): [EOS],
}
START = ("np0", "subj", ())


class _Table(NamedTuple):  # one state's arcs, ready for sampling and scoring
    cum: list[float]
    arcs: list[tuple[tuple, float, tuple]]  # (category, log p(arc), next state)
    index: dict[tuple, int]  # category -> arc


class _Category(NamedTuple):
    words: list[str]
    cum: list[float]
    logp: list[float]


def _scale(p: float, arcs: list) -> list:
    return [(p * q, cat, nxt) for q, cat, nxt in arcs]


def _normalize(x: np.ndarray) -> list[float]:
    return (x / x.sum()).tolist()


class SyntheticLanguage:
    """The language for one seed; see the module docstring."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng([seed, 0])
        self._build_words(rng)

        def prefs(rows: int, cols: int, alpha: float, peak: bool = False) -> list[list[float]]:
            d = rng.dirichlet(np.full(cols, alpha), size=rows)
            if peak:  # row i prefers column i
                d = 0.6 * np.eye(rows, cols) + 0.4 * d
            return [_normalize(0.97 * r + 0.03 / cols) for r in d]

        K = N_NOUN_CLASSES
        self.pi_subj = prefs(1, K, 2.0)[0]  # subject noun class
        self.p_tv = prefs(K, N_TV_CLASSES, 0.3)  # transitive verb class | subject class
        self.p_iv = prefs(K, N_IV_CLASSES, 0.3)  # intransitive verb class | subject class
        self.pi_obj = prefs(N_TV_CLASSES, K, 0.3)  # object noun class | verb class
        self.pi_prep = prefs(N_PREP_CLASSES, K, 0.3)  # noun class | preposition class
        self.p_prep = prefs(1, N_PREP_CLASSES, 2.0)[0]  # preposition class
        self.adj_noun = np.array(prefs(K, K, 0.5, peak=True))  # A[adjective class, noun class]
        self.p_pred = prefs(K, K, 0.5, peak=True)  # predicative adjective class | subject class
        self._tables: dict[tuple, _Table] = {}
        self._roles = {  # NP role: (noun-class preference given ctx, state after the head noun)
            "subj": (lambda x: self.pi_subj, lambda x, n, c: ("sp", n, c)),
            "spp": (lambda x: self.pi_prep[x[2]], lambda x, n, c: ("sr", x[0], x[1])),
            "rc": (lambda x: self.pi_subj, lambda x, n, c: ("rcp", x[0], x[1], n, c)),
            "rcpp": (lambda x: self.pi_prep[x[4]], lambda x, n, c: ("rcv",) + x[:4]),
            "rcobj": (lambda x: self.pi_obj[x[2]], lambda x, n, c: ("vp", x[0], x[1], 1)),
            "obj": (lambda x: self.pi_obj[x[2]], lambda x, n, c: ("ve", x[0], x[1], x[3])),
            "pp": (lambda x: self.pi_prep[x[0]], lambda x, n, c: ("fin",)),
        }

    # ---- vocabulary ----------------------------------------------------------------------------------

    def _build_words(self, rng: np.random.Generator) -> None:
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        taken = {w for ws in FUNCTION_WORDS.values() for w in ws}
        forms = {  # category kind -> (suffix for the first number / only form, suffix for plural)
            "N": ("", "s"),
            "VT": ("s", ""),
            "VI": ("s", ""),
            "ADJ": ("",),
            "ADV": ("ly",),
        }
        classes = {"N": N_NOUN_CLASSES, "VT": N_TV_CLASSES, "VI": N_IV_CLASSES, "ADJ": N_NOUN_CLASSES, "ADV": 1}
        categories = dict(FUNCTION_WORDS)
        for kind, suffixes in forms.items():
            for c in range(classes[kind]):
                stems = []
                while len(stems) < SIZES[kind]:
                    n_syl = 2 if rng.random() < 0.6 else 3
                    stem = "".join(syllables[i] for i in rng.integers(len(syllables), size=n_syl))
                    words = [stem + s for s in suffixes]
                    if not taken.intersection(words):
                        taken.update(words)
                        stems.append(stem)
                stems.sort(key=len)  # frequent words are shorter
                if len(suffixes) == 1:
                    categories[(kind, c) if kind != "ADV" else ("ADV",)] = [s + suffixes[0] for s in stems]
                else:
                    for num, suffix in zip(("sg", "pl"), suffixes):
                        categories[(kind, num, c)] = [s + suffix for s in stems]
        self._categories: dict[tuple, _Category] = {}
        self._word_category: dict[str, tuple[tuple, int]] = {}
        for cat, words in categories.items():
            w = 1.0 / (np.arange(len(words)) + 1.5) ** 1.2  # Zipf-Mandelbrot
            w /= w.sum()
            self._categories[cat] = _Category(words, np.cumsum(w).tolist(), np.log(w).tolist())
            for i, word in enumerate(words):
                self._word_category[word] = (cat, i)
        self.vocabulary: list[str] = [w for ws in categories.values() for w in ws]
        assert len(self.vocabulary) == len(self._word_category), "words must be distinct"

    def category(self, word: str) -> tuple:
        """The grammar category of `word`, e.g. ('N', 'sg', 3), ('VT', 'pl', 0), ('DET', 'any'), ('EOS',)."""
        return self._word_category[word][0]

    # ---- the automaton: state -> [(prob, category, next state)] ---------------------------------------

    def _arcs(self, s: tuple) -> list:
        return getattr(self, "_" + s[0])(*s[1:])

    def _np0(self, role, ctx):  # NP start: determiner or bare plural
        arcs = [((1 - P["bare"]) * q, ("DET", dn), ("np1", role, ctx, dn)) for dn, q in P_DET.items()]
        return arcs + _scale(P["bare"], self._np1(role, ctx, "pl"))

    def _np1(self, role, ctx, dn):  # after the determiner
        pi = self._roles[role][0](ctx)
        arcs = [(P["adj"] * q, ("ADJ", a), ("np2", role, ctx, dn, a)) for a, q in enumerate(pi)]
        return arcs + _scale(1 - P["adj"], self._nouns(role, ctx, dn, pi))

    def _np2(self, role, ctx, dn, a):  # after an adjective of class a
        pi = self._roles[role][0](ctx)
        arcs = [(P["adj2"] * q, ("ADJ", b), ("np2", role, ctx, dn, b)) for b, q in enumerate(pi)]
        return arcs + _scale(1 - P["adj2"], self._nouns(role, ctx, dn, _normalize(np.array(pi) * self.adj_noun[a])))

    def _nouns(self, role, ctx, dn, pi):
        after = self._roles[role][1]
        nums = NUM_GIVEN_DET[dn].items()
        return [(pn * q, ("N", n, c), after(ctx, n, c)) for n, pn in nums for c, q in enumerate(pi)]

    def _sp(self, sn, sc):  # after the subject noun: PP, relative clause or VP
        pps = [(P["subj_pp"] * q, ("PREP", p), ("np0", "spp", (sn, sc, p))) for p, q in enumerate(self.p_prep)]
        return pps + _scale(1 - P["subj_pp"], self._sr(sn, sc))

    def _sr(self, sn, sc):  # relative clause or VP
        return [(P["rc"], ("THAT",), ("rc", sn, sc))] + _scale(1 - P["rc"], self._vp(sn, sc, 1))

    def _rc(self, sn, sc):  # after "that": object relative (an NP) or subject relative (a verb agreeing with sn)
        subj_rel = [(P["rc_vt"] * q, ("VT", sn, v), ("np0", "rcobj", (sn, sc, v))) for v, q in enumerate(self.p_tv[sc])]
        subj_rel += [((1 - P["rc_vt"]) * q, ("VI", sn, v), ("vp", sn, sc, 1)) for v, q in enumerate(self.p_iv[sc])]
        return _scale(P["obj_rel"], self._np0("rc", (sn, sc))) + _scale(1 - P["obj_rel"], subj_rel)

    def _rcp(self, sn, sc, n, c):  # after the object relative's subject: PP (an attractor noun) or its verb
        pps = [(P["rc_pp"] * q, ("PREP", p), ("np0", "rcpp", (sn, sc, n, c, p))) for p, q in enumerate(self.p_prep)]
        return pps + _scale(1 - P["rc_pp"], self._rcv(sn, sc, n, c))

    def _rcv(self, sn, sc, n, c):  # object relative's verb: agrees with its own subject (n), takes the head as object
        q = _normalize(np.array(self.p_tv[c]) * np.array(self.pi_obj)[:, sc])
        return [(q[v], ("VT", n, v), ("vp", sn, sc, 1)) for v in range(N_TV_CLASSES)]

    def _vp(self, sn, sc, k):  # k-th verb phrase of the main clause: agrees with the subject
        arcs = [(P["vt"] * q, ("VT", sn, v), ("np0", "obj", (sn, sc, v, k))) for v, q in enumerate(self.p_tv[sc])]
        arcs += [(P["vi"] * q, ("VI", sn, v), ("ve", sn, sc, k)) for v, q in enumerate(self.p_iv[sc])]
        return arcs + [(1 - P["vt"] - P["vi"], ("COP", sn), ("pred", sn, sc, k))]

    def _pred(self, sn, sc, k):  # predicative adjective
        return [(q, ("ADJ", a), ("ve", sn, sc, k)) for a, q in enumerate(self.p_pred[sc])]

    def _ve(self, sn, sc, k):  # after a VP: "and" VP, PP, adverb or end
        coord = P["coord"] if k == 1 else 0.0
        pps = [(P["vp_pp"] * q, ("PREP", p), ("np0", "pp", (p,))) for p, q in enumerate(self.p_prep)]
        rest = _scale(1 - coord, pps + _scale(1 - P["vp_pp"], self._fin()))
        return ([(coord, ("AND",), ("vp", sn, sc, 2))] if coord else []) + rest

    def _fin(self):
        return [(P["adv"], ("ADV",), ("eos",)), (1 - P["adv"], ("EOS",), START)]

    def _eos(self):
        return [(1.0, ("EOS",), START)]

    def _table(self, state: tuple) -> _Table:
        table = self._tables.get(state)
        if table is None:
            arcs = self._arcs(state)
            cats = [cat for _, cat, _ in arcs]
            assert len(set(cats)) == len(cats), f"state {state} has two arcs with one category"
            assert abs(sum(p for p, _, _ in arcs) - 1) < 1e-9, state
            table = _Table(
                np.cumsum([p for p, _, _ in arcs]).tolist(),
                [(cat, math.log(p), nxt) for p, cat, nxt in arcs],
                {cat: i for i, cat in enumerate(cats)},
            )
            self._tables[state] = table
        return table

    # ---- public interface ----------------------------------------------------------------------------

    def _step(self, state: tuple, word: str) -> tuple[float, tuple]:
        """(log p(word | state), next state); ValueError if `word` cannot follow."""
        if word not in self._word_category:
            raise ValueError(f"{word!r} is not a word of the language")
        cat, i = self._word_category[word]
        table = self._table(state)
        if cat not in table.index:
            raise ValueError(f"{word!r} cannot follow here (state {state})")
        _, log_arc, nxt = table.arcs[table.index[cat]]
        return log_arc + self._categories[cat].logp[i], nxt

    def trace(self, words: list[str]) -> list[tuple]:
        """The automaton's state before each token of `words` (a token stream; <eos> resets)."""
        states, state = [], START
        for w in words:
            states.append(state)
            state = self._step(state, w)[1]
        return states

    def sample(self, n_sentences: int, rng: np.random.Generator) -> tuple[list[list[str]], np.ndarray]:
        """`n_sentences` sentences (without <eos>) and the natural-log probability of every token, each
        sentence's words then its <eos>."""
        block = min(1 << 16, 40 * n_sentences + 64)
        uniforms: list[float] = []
        pos = 0
        sentences, log_probs = [], []
        for _ in range(n_sentences):
            state, words = START, []
            while True:
                if pos + 2 > len(uniforms):
                    uniforms, pos = uniforms[pos:] + rng.random(block).tolist(), 0
                table = self._table(state)
                i = min(bisect_right(table.cum, uniforms[pos] * table.cum[-1]), len(table.cum) - 1)
                cat, log_arc, state = table.arcs[i]
                category = self._categories[cat]
                j = 0
                if len(category.words) > 1:
                    j = min(bisect_right(category.cum, uniforms[pos + 1] * category.cum[-1]), len(category.cum) - 1)
                pos += 2
                log_probs.append(log_arc + category.logp[j])
                if cat == ("EOS",):
                    break
                words.append(category.words[j])
            sentences.append(words)
        return sentences, np.array(log_probs, dtype=np.float64)

    def score(self, words: list[str]) -> np.ndarray:
        """Log-probs of a token stream (each sentence's words followed by <eos>), recovering the state from
        the words alone. Raises ValueError on a stream the language cannot emit."""
        out, state = np.empty(len(words), dtype=np.float64), START
        for t, w in enumerate(words):
            out[t], state = self._step(state, w)
        return out

    def next_distribution(self, prefix: list[str]) -> dict[str, float]:
        """p(next token | prefix) over every token that can follow (words and <eos>)."""
        state = START
        for w in prefix:
            state = self._step(state, w)[1]
        dist = {}
        for cat, log_arc, _ in self._table(state).arcs:
            category = self._categories[cat]
            for word, lp in zip(category.words, category.logp):
                dist[word] = math.exp(log_arc + lp)
        return dist


def write_corpus(directory: pathlib.Path, seed: int = 0, sentences: tuple[int, int, int] = (8000, 800, 800)) -> None:
    """Write {train,valid,test}.txt (one sentence per line, no <eos>) and {split}.logprob.npy (the oracle's
    float64 natural-log probability of each line's words then its <eos>). Same seed, same bytes."""
    directory = pathlib.Path(directory)
    language = SyntheticLanguage(seed)
    rng = np.random.default_rng([seed, 1])
    for split, n in zip(("train", "valid", "test"), sentences):
        lines, log_probs = language.sample(n, rng)
        (directory / f"{split}.txt").write_text("".join(" ".join(s) + "\n" for s in lines), encoding="utf-8")
        np.save(directory / f"{split}.logprob.npy", log_probs)
