"""The published figures the reports compare with.

Mikolov et al. 2011 (ICASSP), *Extensions of recurrent neural network language model*: Table 2 (PTB test
perplexity of each model alone and interpolated with KN5) and Table 3 (the class-based output layer: classes
vs perplexity and speed), all on PTB.
"""

from __future__ import annotations

import pandas as pd

TABLE2_ROWS = {"kn": "KN5", "ffnn": "feed-forward", "rnn-bp": "RNN-BP", "rnn-bptt": "RNN-BPTT", "gru": "GRU",
               "lstm": "LSTM"}
# Mikolov et al. 2011, Table 2: PTB test perplexity (NN alone, NN+KN5); LSTM 2x200 without dropout from
# Zaremba et al. 2014, *Recurrent neural network regularization*.
PAPER_TABLE2 = {"kn": (141.2, None), "ffnn": (141, 118), "rnn-bp": (137, 113), "rnn-bptt": (123, 106),
                "lstm": (114.5, None)}
# Mikolov et al. 2011, Table 3: PTB, RNN with 200 hidden units trained by BPTT (5 steps), by output classes.
PAPER_TABLE3 = pd.DataFrame({
    "classes": ["30", "50", "100", "200", "400", "1000", "2000", "4000", "6000", "8000", "full"],
    "test ppl": [134.0, 136, 136, 136, 134, 131, 128, 127, 127, 124, 123],
    "min/epoch": [12.8, 9.8, 9.1, 9.5, 10.9, 16.1, 25.3, 44.4, 70, 107, 154],
    "test s": [8.8, 6.7, 5.6, 6.0, 8.1, 15.7, 28.7, 57.8, 96.5, 148, 212],
})


def corpora_ptb_first(runs: pd.DataFrame) -> list[str]:
    """The corpora of `runs`, sorted, PTB (the papers' corpus) first."""
    return sorted(runs["corpus"].unique(), key=lambda c: (c != "ptb", c))
