"""Monotonic alignment search (MAS): the best monotonic text-to-frame path through a soft attention.

Given log attention scores ``log_attn[t, l]`` (frame t attends to token l), MAS finds the path
that starts at (0, 0), ends at (T-1, L-1), and at each next frame either stays on the same
token or moves to the next one, maximising the summed log scores (Glow-TTS, RAD-TTS). Every
token gets at least one frame, so it needs T >= L. The result is a hard 0/1 matrix whose
column sums are the token durations; they always add up to the number of frames.

Two implementations with the same answer:

- ``mas`` runs a numba-compiled loop per utterance on the CPU. It is the default: the
  dynamic programme is sequential over frames, which a compiled loop does in microseconds.
- ``mas_torch`` is the same programme vectorised over the batch in torch, looping over frames
  in Python; it stays on the tensor's device, but pays a kernel launch per frame.

Measured on this project's 2-core CPU box for a batch of 16 utterances with 400 frames and
60 tokens: ``mas`` about 0.5 ms, ``mas_torch`` about 26 ms, so the model uses ``mas``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit


@njit(cache=True)
def _mas_one(log_attn: np.ndarray, n_frames: int, n_tokens: int, path: np.ndarray) -> None:
    # value[t, l]: best score of a path from (0, 0) that is at token l on frame t.
    value = np.full((n_frames, n_tokens), -np.inf, dtype=np.float64)
    value[0, 0] = log_attn[0, 0]
    for t in range(1, n_frames):
        # A token further than t is unreachable on frame t; one that cannot still reach the last
        # token before the last frame is a dead end. Skipping both keeps the loop O(T * L).
        low = max(0, n_tokens - n_frames + t)
        high = min(n_tokens - 1, t)
        for tok in range(low, high + 1):
            stay = value[t - 1, tok]
            move = value[t - 1, tok - 1] if tok > 0 else -np.inf
            value[t, tok] = log_attn[t, tok] + max(stay, move)
    tok = n_tokens - 1
    for t in range(n_frames - 1, -1, -1):
        path[t, tok] = 1.0
        # Move back a token when forced to (it must reach token 0 at frame 0) or when the
        # previous frame's best path came from there; ties stay, as in Glow-TTS.
        if tok > 0 and (tok == t or value[t - 1, tok] < value[t - 1, tok - 1]):
            tok -= 1


def _lengths(log_attn: torch.Tensor, frame_lens, token_lens):
    batch, frames, tokens = log_attn.shape
    if frame_lens is None:
        frame_lens = torch.full((batch,), frames, dtype=torch.long)
    if token_lens is None:
        token_lens = torch.full((batch,), tokens, dtype=torch.long)
    frame_lens = torch.as_tensor(frame_lens).long().cpu()
    token_lens = torch.as_tensor(token_lens).long().cpu()
    if bool((frame_lens < token_lens).any()):
        bad = [i for i in range(batch) if frame_lens[i] < token_lens[i]]
        raise ValueError(
            f"monotonic alignment needs at least one frame per token; utterances {bad} of the "
            f"batch have fewer frames ({frame_lens[bad].tolist()}) than tokens "
            f"({token_lens[bad].tolist()})"
        )
    return frame_lens, token_lens


def _as_batch(log_attn: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if log_attn.dim() == 2:
        return log_attn[None], True
    if log_attn.dim() == 4:  # the model's [B, 1, T, L] layout
        return log_attn[:, 0], False
    return log_attn, False


# torch.compile must not trace into numba or a Python loop over frames; it calls these eagerly.
@torch.compiler.disable
@torch.no_grad()
def mas(log_attn: torch.Tensor, frame_lens=None, token_lens=None) -> torch.Tensor:
    """Hard monotonic alignment of ``log_attn`` ([T, L], [B, T, L] or [B, 1, T, L]).

    ``frame_lens`` / ``token_lens`` ([B]) mark the valid part of each padded matrix; padding
    stays 0 in the result. Returns a float 0/1 tensor of the input's shape, dtype and device.
    """
    batched, single = _as_batch(log_attn)
    frame_lens, token_lens = _lengths(batched, frame_lens, token_lens)
    scores = batched.detach().float().cpu().numpy()
    paths = np.zeros(scores.shape, dtype=np.float32)
    for i in range(scores.shape[0]):
        n_frames, n_tokens = int(frame_lens[i]), int(token_lens[i])
        _mas_one(
            np.ascontiguousarray(scores[i, :n_frames, :n_tokens]),
            n_frames,
            n_tokens,
            paths[i, :n_frames, :n_tokens],
        )
    out = torch.from_numpy(paths).to(device=log_attn.device, dtype=log_attn.dtype)
    return out[0] if single else out.view_as(log_attn)


@torch.compiler.disable
@torch.no_grad()
def mas_torch(log_attn: torch.Tensor, frame_lens=None, token_lens=None) -> torch.Tensor:
    """The same search as ``mas``, vectorised over the batch in torch on the input's device."""
    batched, single = _as_batch(log_attn)
    frame_lens, token_lens = _lengths(batched, frame_lens, token_lens)
    device = batched.device
    frame_lens, token_lens = frame_lens.to(device), token_lens.to(device)
    batch, frames, tokens = batched.shape
    scores = batched.detach().double()
    tok_idx = torch.arange(tokens, device=device)
    neg_inf = torch.tensor(-float("inf"), dtype=torch.float64, device=device)

    # Scores outside the valid region are -inf so no path can use them.
    valid = (torch.arange(frames, device=device)[None, :, None] < frame_lens[:, None, None]) & (
        tok_idx[None, None, :] < token_lens[:, None, None]
    )
    scores = torch.where(valid, scores, neg_inf)
    value = torch.full_like(scores, -float("inf"))
    value[:, 0, 0] = scores[:, 0, 0]
    for t in range(1, frames):
        prev = value[:, t - 1]
        moved = torch.cat([prev.new_full((batch, 1), -float("inf")), prev[:, :-1]], dim=1)
        value[:, t] = scores[:, t] + torch.maximum(prev, moved)

    path = torch.zeros_like(scores, dtype=torch.float32)
    tok = token_lens - 1
    rows = torch.arange(batch, device=device)
    for t in range(frames - 1, -1, -1):
        active = t < frame_lens
        path[rows[active], t, tok[active]] = 1.0
        if t == 0:
            break
        prev = value[:, t - 1]
        stay = prev.gather(1, tok[:, None])[:, 0]
        move = prev.gather(1, (tok - 1).clamp(min=0)[:, None])[:, 0]
        step_back = active & (tok > 0) & ((tok == t) | (stay < move))
        tok = tok - step_back.long()
    out = path.to(log_attn.dtype)
    return out[0] if single else out.view_as(log_attn)
