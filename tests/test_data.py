"""`train.data`'s one packer (`pack_rows`) in both of its modes: first fit (`pack`, training) and
next fit (`pack_batches`, the stream `inspect.pack_stream` reads)."""

import numpy as np
import pytest

from gptoss_jax.train import data


def _ex(*lengths):
    return [([i + 1] * n, [1] * n) for i, n in enumerate(lengths)]


def _lengths(rows):
    return [[len(t) for t, _ in row] for row in rows]


def test_first_fit_fills_earlier_gaps_and_next_fit_does_not():
    ex = _ex(5, 6, 3, 2)
    assert _lengths(data.pack_rows(ex, 8, fit="first")) == [[5, 3], [6, 2]]
    assert _lengths(data.pack_rows(ex, 8, fit="next")) == [[5], [6], [3, 2]]
    with pytest.raises(ValueError, match="fit must be one of"):
        list(data.pack_rows(ex, 8, fit="best"))
    with pytest.raises(ValueError, match="does not fit a row of 4"):
        list(data.pack_rows(ex, 4))


def test_next_fit_yields_each_row_once_closed():
    closed = []

    def stream():
        for e in _ex(5, 6, 3):
            closed.append(len(e[0]))
            yield e

    rows = data.pack_rows(stream(), 8, fit="next")
    assert _lengths([next(rows)]) == [[5]] and closed == [5, 6]  # read one example ahead, no more


def test_pack_with_either_fit_and_batches():
    ex = _ex(5, 6, 3, 2)
    first, nxt = data.pack(ex, 8), data.pack(ex, 8, fit="next")
    np.testing.assert_array_equal(first.tokens, [[1] * 5 + [3] * 3, [2] * 6 + [4] * 2])
    np.testing.assert_array_equal(nxt.segment_ids, [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2, [1, 1, 1, 2, 2, 0, 0, 0]])
    batches = list(data.pack_batches(ex, 8, 2))
    assert [len(b) for b in batches] == [2, 2]  # the last batch filled up with an empty row
    np.testing.assert_array_equal(batches[0].tokens, nxt.tokens[:2])
    np.testing.assert_array_equal(batches[1].positions, [[0, 1, 2, 0, 1, 0, 0, 0], [0] * 8])
    assert not batches[1].segment_ids[1].any()
    # a mask of None (a stream to read, not to train on) leaves the loss mask at 0
    unmasked = next(data.pack_batches([(t, None) for t, _ in ex], 8, 4))
    assert not unmasked.loss_mask.any() and unmasked.tokens.any()
