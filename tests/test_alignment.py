"""Monotonic alignment search on matrices whose best path is worked out by hand."""

import pytest
import torch

from training.alignment import mas, mas_torch

# Frame 1 prefers token 2, which a monotonic path cannot reach yet. The three monotonic paths
# from (0, 0) to (3, 2) are durations (2,1,1): .9*.2*.8*.8 = .1152, (1,2,1): .9*.1*.8*.8 =
# .0576 and (1,1,2): .9*.1*.1*.8 = .0072, so the answer is (2, 1, 1).
PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],
        [0.2, 0.1, 0.7],
        [0.1, 0.8, 0.1],
        [0.1, 0.1, 0.8],
    ]
)
EXPECTED = torch.tensor(
    [
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ]
)


@pytest.mark.parametrize("search", [mas, mas_torch])
def test_known_matrix(search):
    assert torch.equal(search(PROBS.log()), EXPECTED)


@pytest.mark.parametrize("search", [mas, mas_torch])
def test_padded_batch_matches_unpadded(search):
    padded = torch.full((2, 1, 6, 5), -1e4)
    padded[0, 0, :4, :3] = PROBS.log()
    # Second utterance: as many frames as tokens, so the only path is the diagonal.
    padded[1, 0, :5, :5] = torch.randn(5, 5)
    out = search(padded, torch.tensor([4, 5]), torch.tensor([3, 5]))
    assert out.shape == padded.shape
    assert torch.equal(out[0, 0, :4, :3], EXPECTED)
    assert torch.equal(out[1, 0, :5, :5], torch.eye(5))
    assert out[0, 0, 4:].sum() == 0 and out[0, 0, :, 3:].sum() == 0
    assert out[1, 0, 5:].sum() == 0


def test_both_searches_agree_and_paths_are_monotonic():
    torch.manual_seed(0)
    scores = torch.randn(8, 50, 20).log_softmax(-1)
    frame_lens = torch.randint(20, 51, (8,))
    token_lens = torch.randint(1, 21, (8,))
    a = mas(scores, frame_lens, token_lens)
    assert torch.equal(a, mas_torch(scores, frame_lens, token_lens))
    for i in range(8):
        n, m = int(frame_lens[i]), int(token_lens[i])
        path = a[i, :n, :m]
        assert torch.equal(path.sum(1), torch.ones(n))  # one token per frame
        assert (path.sum(0) >= 1).all()  # every token spoken
        tok = path.argmax(1)
        assert tok[0] == 0 and tok[-1] == m - 1
        assert ((tok[1:] - tok[:-1]) >= 0).all() and ((tok[1:] - tok[:-1]) <= 1).all()


def test_fewer_frames_than_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one frame per token"):
        mas(torch.zeros(1, 3, 5), torch.tensor([3]), torch.tensor([5]))
