"""The acoustic model: text tokens + a speaker embedding in, an 80-band log-mel out.

A non-autoregressive model of the FastPitch / FastSpeech 2 family, read top to bottom:

1. ``TextEncoder``: token embedding + sinusoidal positions + feed-forward transformer blocks
   (self-attention and a 1-d convolution, as in FastSpeech).
2. Speaker conditioning: the 256-d Resemblyzer utterance embedding goes through one small
   shared layer, and from there into every layer norm of the encoder, the variance predictors
   and the decoder (conditional layer norm, AdaSpeech 4 / StyleSpeech): each predicts its own
   scale and shift from the voice. It is also projected and added to the encoder output.
   Voice statistics (training.voice_stats: each mel band's mean and spread over the voice's
   speech, its median pitch) join the embedding there, and are put back exactly at the output:
   the decoder speaks in the voice's standardised units and the pitch predictor relative to
   the voice's level, so a voice the model never heard keeps its own spectrum and pitch.
3. ``Aligner`` (RAD-TTS): small conv encoders turn the token embeddings into keys and the
   target mel into queries; their distances give a soft text-to-frame attention (trained by
   the forward-sum loss); monotonic alignment search turns it into hard durations without
   gradient. No external aligner, no stop token: the model cannot skip or repeat text.
4. ``VariancePredictor`` x 3: log duration, pitch and energy per token. Pitch and energy
   targets are the frame values averaged over each token's hard duration; during training the
   targets (not the predictions) are embedded and added to the encoder output.
5. Length regulation: every token state is repeated for its duration, giving frames.
6. ``Decoder``: the same transformer blocks over frames, then a linear layer to 80 mel bands.

Layouts: mels are [B, 80, T]; token-level tensors [B, L]; masks are bool, True = valid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from training import voice_stats as vs
from training.alignment import mas

# Log probabilities of padded cells: finite, so masked sums and products never make NaN.
LOG_ZERO = -1e4
# Typical centre and spread of the natural-log mel of loudness-normalised speech. The aligner
# sees (mel - MEL_CENTER) / MEL_SCALE: on raw log-mels (-11 to 2) its distances are dominated
# by the offset, and on dev-en-8spk the forward-sum loss then stalls near 4.7 while the soft
# attention collapses onto a few tokens; standardised, it falls steadily (4.8 -> 2.8 in 400
# aligner-only steps). The mel output layer starts at MEL_CENTER for the same reason.
MEL_CENTER = -5.5
MEL_SCALE = 2.2
# Spread of speakers' median log F0 (0.25 nepers is about 4 semitones), so the pitch level enters
# the conditioning at O(1) like the mel statistics.
LOG_F0_SCALE = 0.25


@dataclass
class ModelConfig:
    d_model: int = 256
    n_heads: int = 2
    enc_layers: int = 4
    dec_layers: int = 4
    ff_dim: int = 1024
    ff_kernel: int = 3
    dropout: float = 0.1
    predictor_dim: int = 256
    predictor_kernel: int = 3
    predictor_dropout: float = 0.1
    align_dim: int = 80
    # RAD-TTS scales squared key/query distances by this before the softmax.
    align_temperature: float = 0.0005
    # A beta-binomial prior that favours the diagonal makes the aligner converge in hundreds of
    # steps instead of thousands; it only shapes training, inference never uses the aligner.
    attn_prior: bool = True
    attn_prior_scaling: float = 1.0
    n_mels: int = 80
    speaker_dim: int = 256
    # A predicted duration above this many frames (~0.9 s) is a predictor failure, not speech.
    max_duration: int = 75
    # "cln": the speaker sets the scale and shift of every layer norm (encoder, predictors,
    # decoder) besides the vector added to the encoder output. "add": only that vector, as
    # checkpoints made before conditional layer norms (kept to measure against).
    speaker_conditioning: str = "cln"
    # Mel and pitch predicted relative to the voice's own statistics (training.voice_stats: mean
    # and spread of the log-mel of its speech, median log F0), which are put back at the output
    # and also steer the conditional norms. False: checkpoints from before them.
    voice_stats: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Parameter counts (printed by the CLI; 80 symbols): tiny 1.2 M (0.87 M without the conditional
# norms; trains on a laptop CPU in minutes), small 6.4 M, normal 47 M (FastPitch's width and
# depth), big 97 M.
MODEL_SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        d_model=96,
        n_heads=2,
        enc_layers=2,
        dec_layers=2,
        ff_dim=256,
        predictor_dim=96,
        align_dim=48,
        dropout=0.1,
        voice_stats=True,
    ),
    "small": ModelConfig(
        d_model=192,
        n_heads=2,
        enc_layers=3,
        dec_layers=3,
        ff_dim=640,
        predictor_dim=192,
        align_dim=80,
        voice_stats=True,
    ),
    "normal": ModelConfig(
        d_model=384,
        n_heads=2,
        enc_layers=6,
        dec_layers=6,
        ff_dim=1536,
        predictor_dim=256,
        align_dim=80,
        voice_stats=True,
    ),
    "big": ModelConfig(
        d_model=512,
        n_heads=4,
        enc_layers=6,
        dec_layers=8,
        ff_dim=2048,
        predictor_dim=384,
        align_dim=96,
        voice_stats=True,
    ),
}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sinusoidal_positions(length: int, dim: int, device) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


# ----------------------------------------------------------------------------- building blocks


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask[:, None, None, :],  # every query sees only the valid keys
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


# Keys of the conditional layer norms' weights; a checkpoint without them (written before they
# existed) loads with them at their identity initialisation.
CONDITIONING_KEYS = ("speaker_cond.", ".cond.")


def is_conditioning_key(name: str) -> bool:
    return name.startswith(CONDITIONING_KEYS[0]) or CONDITIONING_KEYS[1] in name


class ConditionalLayerNorm(nn.LayerNorm):
    """LayerNorm whose scale and shift are moved by the speaker (AdaSpeech 4, StyleSpeech).

    y = LN(x) * (1 + s(spk)) + b(spk), with s and b one zero-initialised linear layer: a new
    model starts exactly as plain layer norms, and an old checkpoint's `weight`/`bias` keep
    their names and meaning, so it loads unchanged. Every block seeing the voice lets a voice
    the model never heard steer the decoder and the predictors, not only the encoder output.
    """

    def __init__(self, dim: int, cond_dim: int | None):
        super().__init__(dim)
        self.cond = None
        if cond_dim:
            self.cond = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)

    def forward(self, x: torch.Tensor, spk: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        if self.cond is None or spk is None:
            return y
        scale, shift = self.cond(spk.to(y.dtype))[:, None, :].chunk(2, dim=-1)
        return y * (1 + scale) + shift


class FFTBlock(nn.Module):
    """Pre-norm transformer block whose feed-forward part is a convolution (FastSpeech's FFT).

    The convolution gives each position its neighbours, which speech needs more than global
    context; pre-norm keeps deep stacks trainable without a long warm-up.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        ff_dim: int,
        kernel: int,
        dropout: float,
        cond_dim: int | None = None,
    ):
        super().__init__()
        self.norm1 = ConditionalLayerNorm(dim, cond_dim)
        self.attn = SelfAttention(dim, n_heads, dropout)
        self.norm2 = ConditionalLayerNorm(dim, cond_dim)
        self.conv1 = nn.Conv1d(dim, ff_dim, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(ff_dim, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, spk=None) -> torch.Tensor:
        keep = mask[..., None].to(x.dtype)
        x = x + self.drop(self.attn(self.norm1(x, spk), mask))
        # Zero the padding before the convolution so it never leaks into valid positions.
        h = (self.norm2(x, spk) * keep).transpose(1, 2)
        h = self.conv2(self.drop(F.relu(self.conv1(h)))).transpose(1, 2)
        return (x + self.drop(h)) * keep


class TransformerStack(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int, cond_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(
            FFTBlock(cfg.d_model, cfg.n_heads, cfg.ff_dim, cfg.ff_kernel, cfg.dropout, cond_dim)
            for _ in range(n_layers)
        )
        self.norm = ConditionalLayerNorm(cfg.d_model, cond_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, spk=None) -> torch.Tensor:
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask, spk)
        return self.norm(x, spk) * mask[..., None].to(x.dtype)


class VariancePredictor(nn.Module):
    """Two convolutions and a linear layer: one number per token (log duration, pitch, energy)."""

    def __init__(
        self, in_dim: int, dim: int, kernel: int, dropout: float, cond_dim: int | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv1d(in_dim, dim, kernel, padding=kernel // 2)
        self.norm1 = ConditionalLayerNorm(dim, cond_dim)
        self.conv2 = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.norm2 = ConditionalLayerNorm(dim, cond_dim)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, spk=None) -> torch.Tensor:
        keep = mask[..., None].to(x.dtype)
        h = F.relu(self.conv1((x * keep).transpose(1, 2))).transpose(1, 2)
        h = self.drop(self.norm1(h, spk)) * keep
        h = F.relu(self.conv2(h.transpose(1, 2))).transpose(1, 2)
        h = self.drop(self.norm2(h, spk))
        return self.proj(h).squeeze(-1) * mask.to(h.dtype)


# ----------------------------------------------------------------------------- the aligner


def beta_binomial_log_prior(
    frame_lens: torch.Tensor, token_lens: torch.Tensor, frames: int, tokens: int, scaling: float
) -> torch.Tensor:
    """log P(token l | frame t) [B, T, L]: a beta-binomial over the tokens centred on the diagonal.

    RAD-TTS's alignment prior: on frame t of T the distribution over the L tokens is
    BetaBinomial(n=L-1, a=s*(t+1), b=s*(T-t)), so early frames favour early tokens.
    """
    device = frame_lens.device
    t = torch.arange(frames, device=device, dtype=torch.float32)[None, :, None]
    k = torch.arange(tokens, device=device, dtype=torch.float32)[None, None, :]
    n = (token_lens.float() - 1)[:, None, None]
    total = frame_lens.float()[:, None, None]
    # Clamp so padded cells stay finite; they are masked by the caller.
    k = torch.minimum(k, n)
    a = scaling * (t + 1)
    b = (scaling * (total - t)).clamp(min=scaling)

    def log_beta(x, y):
        return torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)

    log_choose = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return log_choose + log_beta(k + a, n - k + b) - log_beta(a, b)


class Aligner(nn.Module):
    """Soft text-to-mel attention from key/query distances (RAD-TTS / FastPitch 1.1)."""

    def __init__(self, text_dim: int, n_mels: int, dim: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.key = nn.Sequential(
            nn.Conv1d(text_dim, 2 * text_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(2 * text_dim, dim, 1),
        )
        self.query = nn.Sequential(
            nn.Conv1d(n_mels, 2 * n_mels, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(2 * n_mels, n_mels, 1),
            nn.ReLU(),
            nn.Conv1d(n_mels, dim, 1),
        )

    def forward(self, text_emb, mels, text_mask, mel_mask, log_prior=None):
        """Returns (attn_logprob, attn_soft), both [B, 1, T, L], normalised over valid tokens."""
        # Distances and softmax in float32 even under bf16 autocast: the temperature is tiny and
        # a bf16 distance would round the attention to a handful of values.
        with torch.autocast(device_type=mels.device.type, enabled=False):
            keys = self.key(text_emb.float().transpose(1, 2))  # [B, C, L]
            queries = self.query((mels.float() - MEL_CENTER) / MEL_SCALE)  # [B, C, T]
            # ||q - k||^2 = |q|^2 - 2 q.k + |k|^2 as a matmul, never a [B, C, T, L] tensor.
            dist = (
                queries.pow(2).sum(1)[:, :, None]
                - 2 * queries.transpose(1, 2) @ keys
                + keys.pow(2).sum(1)[:, None, :]
            )
            scores = -self.temperature * dist
            token_ok = text_mask[:, None, :]
            scores = scores.masked_fill(~token_ok, -float("inf"))
            logprob = F.log_softmax(scores, dim=-1)
            if log_prior is not None:
                logprob = F.log_softmax(logprob + log_prior, dim=-1)
            valid = token_ok & mel_mask[:, :, None]
            logprob = logprob.masked_fill(~valid, LOG_ZERO)
            soft = logprob.exp() * valid
        return logprob[:, None], soft[:, None]


# ----------------------------------------------------------------------------- helpers


def average_over_durations(values: torch.Tensor, durations: torch.Tensor, voiced_only: bool):
    """Mean of frame values [B, T] over each token's frames given durations [B, L] -> [B, L].

    With ``voiced_only`` frames holding exactly 0 (unvoiced pitch) are left out, and a token
    without a voiced frame gets 0, as FastPitch does for pitch.
    """
    durations = durations.long()
    ends = durations.cumsum(1)
    starts = ends - durations
    values = values.float()
    cumulative = F.pad(values.cumsum(1), (1, 0))
    sums = cumulative.gather(1, ends) - cumulative.gather(1, starts)
    if voiced_only:
        counted = F.pad((values != 0).float().cumsum(1), (1, 0))
        counts = counted.gather(1, ends) - counted.gather(1, starts)
    else:
        counts = durations.float()
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


def regulate_length(states: torch.Tensor, durations: torch.Tensor, max_len: int | None = None):
    """Repeat each token state [B, L, D] for its duration [B, L] -> frames [B, T, D], lengths [B]."""
    durations = durations.long()
    ends = durations.cumsum(1)
    lengths = ends[:, -1]
    frames = int(lengths.max()) if max_len is None else max_len
    frame_idx = torch.arange(frames, device=states.device)[None, :].expand(states.shape[0], -1)
    # The token covering frame f is the number of token ends at or before f.
    token_idx = torch.searchsorted(ends.contiguous(), frame_idx.contiguous(), right=True)
    token_idx = token_idx.clamp(max=states.shape[1] - 1)
    out = states.gather(1, token_idx[..., None].expand(-1, -1, states.shape[2]))
    mask = frame_idx < lengths[:, None]
    return out * mask[..., None].to(out.dtype), lengths


# ----------------------------------------------------------------------------- the model


class TTSModel(nn.Module):
    # Buffers (register_buffer), declared for type checkers.
    pitch_mean: torch.Tensor
    pitch_std: torch.Tensor
    energy_mean: torch.Tensor
    energy_std: torch.Tensor
    default_voice: torch.Tensor

    def __init__(self, cfg: ModelConfig, n_symbols: int):
        super().__init__()
        self.cfg = cfg
        self.n_symbols = n_symbols
        d = cfg.d_model
        # Unit-variance rows (torch's default): the aligner's keys are computed from them, and
        # small rows leave every key alike, so a few tokens win every frame.
        self.embed = nn.Embedding(n_symbols, d, padding_idx=0)
        if cfg.speaker_conditioning not in ("cln", "add"):
            raise ValueError(
                f"speaker_conditioning must be 'cln' or 'add', not {cfg.speaker_conditioning!r}"
            )
        cond = d if cfg.speaker_conditioning == "cln" else None
        stats_dim = vs.dim(cfg.n_mels) if cfg.voice_stats else 0
        # One shared layer between the embedding and every norm: a few hundred parameters per
        # norm instead of a 256-wide map each, and one place where voices are compared.
        self.speaker_cond = (
            nn.Sequential(nn.Linear(cfg.speaker_dim + stats_dim, d), nn.SiLU()) if cond else None
        )
        self.encoder = TransformerStack(cfg, cfg.enc_layers, cond)
        self.speaker_proj = nn.Linear(cfg.speaker_dim, d)
        self.aligner = Aligner(d, cfg.n_mels, cfg.align_dim, cfg.align_temperature)

        def predictor():
            return VariancePredictor(
                d, cfg.predictor_dim, cfg.predictor_kernel, cfg.predictor_dropout, cond
            )

        self.duration_predictor = predictor()
        self.pitch_predictor = predictor()
        self.pitch_embed = nn.Conv1d(1, d, 3, padding=1)
        self.energy_predictor = predictor()
        self.energy_embed = nn.Conv1d(1, d, 3, padding=1)
        self.decoder = TransformerStack(cfg, cfg.dec_layers, cond)
        self.mel_out = nn.Linear(d, cfg.n_mels)
        # With voice statistics the voice's own mean log-mel is added to the output, so the
        # layer predicts deviations from it and starts at 0; without, at the typical level.
        nn.init.constant_(self.mel_out.bias, 0.0 if cfg.voice_stats else MEL_CENTER)
        if cfg.voice_stats:
            # The voice used when a caller gives an embedding without statistics: the mean of
            # the training voices (the trainer keeps it up to date), typical speech until then.
            default = torch.full((vs.dim(cfg.n_mels),), MEL_CENTER)
            default[cfg.n_mels : 2 * cfg.n_mels] = 1.0
            default[-1] = vs.UNKNOWN_LOG_F0
            self.register_buffer("default_voice", default)
        # Feature statistics of the training data (Hz and energy units), so infer() can take
        # a pitch shift in semitones and an energy scale on the real, not the normalised, values.
        self.register_buffer("pitch_mean", torch.tensor(0.0))
        self.register_buffer("pitch_std", torch.tensor(1.0))
        self.register_buffer("energy_mean", torch.tensor(0.0))
        self.register_buffer("energy_std", torch.tensor(1.0))

    def set_feature_stats(self, stats: dict) -> None:
        """Store pitch/energy mean and std ({"pitch_mean": ..., ...}) from the feature cache."""
        for name in ("pitch_mean", "pitch_std", "energy_mean", "energy_std"):
            if name in stats and stats[name] is not None:
                getattr(self, name).fill_(float(stats[name]))

    def speaker_condition(
        self, spk_emb: torch.Tensor, voice: dict | None = None
    ) -> torch.Tensor | None:
        """[B, 256] unit-length embeddings (and the voice terms) -> [B, d] the conditional
        norms read (None: "add").

        Scaled by sqrt(256) first so its entries are O(1): at unit length each is about 0.06
        and the shared layer would start with a voice signal too faint to learn from.
        """
        if self.speaker_cond is None:
            return None
        x = spk_emb.float() * math.sqrt(self.cfg.speaker_dim)
        if voice is None and self.cfg.voice_stats:
            voice = self.voice_terms(None, spk_emb.shape[0])
        if voice is not None:
            x = torch.cat([x, voice["features"]], dim=1)
        return self.speaker_cond(x)

    def voice_of_batch(self, batch: dict) -> torch.Tensor:
        """Each utterance's own voice statistics [B, 2 n_mels + 1] from its target mel and pitch
        (training: the voice is read off the very clip being learned, as a reference is)."""
        hz = vs.pitch_in_hz(batch["pitch"], self.pitch_mean, self.pitch_std)
        return vs.voice_statistics(batch["mels"], hz, batch["mel_lens"])

    def voice_terms(self, stats: torch.Tensor | None, batch_size: int) -> dict | None:
        """Voice statistics [B, 2 n_mels + 1] (None: the default voice) -> what the model puts
        back: the mel mean and spread [B, n_mels] each, the pitch offset in normalised units
        [B] and the conditioning features. None for a model without voice statistics."""
        if not self.cfg.voice_stats:
            return None
        if stats is None:
            stats = self.default_voice[None].expand(batch_size, -1)
        stats = stats.float().to(self.default_voice.device)
        mel_mean, spread, log_f0 = vs.split(stats, self.cfg.n_mels)
        spread = spread.clamp(min=vs.MIN_SPREAD)
        # Pitch statistics are unset (0) only in a model that never saw data: no pitch offset.
        has_pitch = (self.pitch_mean > 0).float()
        centre = self.pitch_mean.clamp(min=1.0).log()
        known = (log_f0 != vs.UNKNOWN_LOG_F0).float() * has_pitch
        log_f0 = known * log_f0 + (1 - known) * centre
        pitch_offset = (log_f0.exp() - self.pitch_mean) / self.pitch_std * has_pitch
        features = torch.cat(
            [
                (mel_mean - MEL_CENTER) / MEL_SCALE,
                spread.log(),
                ((log_f0 - centre) / LOG_F0_SCALE)[:, None],
            ],
            dim=1,
        )
        return {"mel": mel_mean, "spread": spread, "pitch": pitch_offset, "features": features}

    def encode(self, tokens, text_mask, spk_emb, cond=None):
        text_emb = self.embed(tokens)
        enc = self.encoder(text_emb, text_mask, cond)
        spk = self.speaker_proj(spk_emb.to(enc.dtype))[:, None, :]
        return text_emb, (enc + spk) * text_mask[..., None].to(enc.dtype)

    def add_pitch(self, enc, pitch, text_mask):
        """Add embedded token pitch ([B, L], target or prediction) to the token states."""
        keep = text_mask[..., None].to(enc.dtype)
        return enc + self.pitch_embed(pitch[:, None].to(enc.dtype)).transpose(1, 2) * keep

    def add_energy(self, enc, energy, text_mask):
        keep = text_mask[..., None].to(enc.dtype)
        return enc + self.energy_embed(energy[:, None].to(enc.dtype)).transpose(1, 2) * keep

    def decode(self, enc, durations, max_len=None, cond=None, voice=None):
        frames, mel_lens = regulate_length(enc, durations, max_len)
        mel_mask = lengths_to_mask(mel_lens, frames.shape[1])
        hidden = self.decoder(frames, mel_mask, cond)
        mel = self.mel_out(hidden).transpose(1, 2)
        if voice is not None:
            # The decoder speaks in units of the voice: each band standardised by the voice's
            # own mean and spread, put back here.
            mel = mel * voice["spread"][:, :, None].to(mel.dtype) + voice["mel"][:, :, None].to(
                mel.dtype
            )
        return mel * mel_mask[:, None].to(mel.dtype), mel_lens, mel_mask

    def predict_pitch(self, enc, text_mask, cond, voice):
        pitch = self.pitch_predictor(enc, text_mask, cond)
        if voice is not None:
            pitch = pitch + voice["pitch"][:, None].to(pitch.dtype) * text_mask.to(pitch.dtype)
        return pitch

    def forward(self, batch: dict) -> dict:
        """Teacher-forced pass over a collated batch (training.data.collate).

        Besides the contract's shapes: ``log_dur_pred`` predicts log(1 + frames) of
        ``dur_target`` (integer-valued floats from MAS, summing to each mel length);
        ``attn_logprob`` holds log-probabilities normalised over the valid tokens (prior
        included) with padded cells at LOG_ZERO; ``attn_soft`` is its exp, 0 on padding;
        pitch and energy targets are token means of the normalised frame values (pitch over
        voiced frames only).
        """
        tokens, token_lens = batch["tokens"], batch["token_lens"]
        mels, mel_lens = batch["mels"].float(), batch["mel_lens"]
        text_mask = lengths_to_mask(token_lens, tokens.shape[1])
        mel_mask = lengths_to_mask(mel_lens, mels.shape[2])

        stats = batch.get("voice_stats")
        if self.cfg.voice_stats and stats is None:
            stats = self.voice_of_batch(batch)
        voice = self.voice_terms(stats, tokens.shape[0])
        cond = self.speaker_condition(batch["spk_emb"], voice)
        text_emb, enc = self.encode(tokens, text_mask, batch["spk_emb"], cond)

        log_prior = None
        if self.cfg.attn_prior:
            log_prior = beta_binomial_log_prior(
                mel_lens, token_lens, mels.shape[2], tokens.shape[1], self.cfg.attn_prior_scaling
            )
        attn_logprob, attn_soft = self.aligner(text_emb, mels, text_mask, mel_mask, log_prior)
        attn_hard = mas(attn_logprob, mel_lens, token_lens)  # no gradient
        dur_target = attn_hard.sum(2)[:, 0]  # [B, L] frames per token

        log_dur_pred = self.duration_predictor(enc, text_mask, cond)
        pitch_pred = self.predict_pitch(enc, text_mask, cond, voice)
        frames = mels.shape[2]
        pitch_target = average_over_durations(batch["pitch"][:, :frames], dur_target, True)
        energy_target = average_over_durations(batch["energy"][:, :frames], dur_target, False)
        enc = self.add_pitch(enc, pitch_target, text_mask)
        # Energy is predicted after pitch is added: loudness follows the intonation.
        energy_pred = self.energy_predictor(enc, text_mask, cond)
        enc = self.add_energy(enc, energy_target, text_mask)

        mel_pred, _, _ = self.decode(enc, dur_target, max_len=frames, cond=cond, voice=voice)
        # The loss runs in float32 whatever the autocast dtype of the layers was.
        return {
            "mel_pred": mel_pred.float(),
            "mel_target": mels,
            "mel_mask": mel_mask,
            "log_dur_pred": log_dur_pred.float(),
            "dur_target": dur_target,
            "text_mask": text_mask,
            "pitch_pred": pitch_pred.float(),
            "pitch_target": pitch_target,
            "energy_pred": energy_pred.float(),
            "energy_target": energy_target,
            "attn_logprob": attn_logprob,
            "attn_soft": attn_soft,
            "attn_hard": attn_hard,
            "token_lens": token_lens,
            "mel_lens": mel_lens,
            "voice_stats": stats,
        }

    @torch.no_grad()
    def infer(
        self,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
        spk_emb: torch.Tensor,
        duration_scale: float = 1.0,
        pitch_shift: float = 0.0,
        energy_scale: float = 1.0,
        voice_stats: torch.Tensor | None = None,
    ) -> dict:
        """Synthesise mels from tokens [B, L] and speaker embeddings [B, 256].

        ``duration_scale`` > 1 speaks slower. ``pitch_shift`` is in semitones: the predicted
        pitch is moved in Hz by 2**(shift/12) through the stored pitch statistics.
        ``energy_scale`` multiplies the predicted energy in its real (not normalised) units.
        ``voice_stats`` [B, 2 n_mels + 1] (training.voice_stats, from the reference clips) sets
        the voice's spectrum and pitch level; None takes the training voices' mean.
        Returns mel [B, 80, T], mel_lens [B] and durations [B, L] (frames per token).
        """
        text_mask = lengths_to_mask(token_lens, tokens.shape[1])
        voice = self.voice_terms(voice_stats, tokens.shape[0])
        cond = self.speaker_condition(spk_emb, voice)
        _, enc = self.encode(tokens, text_mask, spk_emb, cond)

        # The predictor learns log(1 + frames), so a zero-length token is representable.
        log_dur = self.duration_predictor(enc, text_mask, cond).float()
        durations = (torch.exp(log_dur) - 1) * duration_scale
        # clamp keeps NaN, and NaN.long() is a huge negative frame count: a broken checkpoint
        # must give silence-length output, not a crash deep inside length regulation.
        durations = (
            durations.nan_to_num(0.0).clamp(0, self.cfg.max_duration).round().long() * text_mask
        )
        # Every utterance needs at least one frame; give it to the first token.
        empty = durations.sum(1) == 0
        durations[empty, 0] = 1

        pitch = self.predict_pitch(enc, text_mask, cond, voice).float()
        if pitch_shift:
            ratio = 2.0 ** (pitch_shift / 12.0)
            hz = pitch * self.pitch_std + self.pitch_mean
            pitch = (hz * ratio - self.pitch_mean) / self.pitch_std * text_mask
        enc = self.add_pitch(enc, pitch, text_mask)
        energy = self.energy_predictor(enc, text_mask, cond).float()
        if energy_scale != 1.0:
            real = energy * self.energy_std + self.energy_mean
            energy = (real * energy_scale - self.energy_mean) / self.energy_std * text_mask
        enc = self.add_energy(enc, energy, text_mask)
        mel, mel_lens, _ = self.decode(enc, durations, cond=cond, voice=voice)
        return {"mel": mel.float(), "mel_lens": mel_lens, "durations": durations}


def load_model_weights(model: TTSModel, state: dict) -> list[str]:
    """Load `state` into `model`; weights of the conditional layer norms may be missing.

    A checkpoint written before every block was conditioned on the speaker lacks exactly those
    keys; they keep their initialisation, which makes each conditional norm a plain LayerNorm,
    so the old model computes what it always did. Any other missing or unexpected key is an
    error (RuntimeError, as load_state_dict raises). Returns the keys that were filled in.
    """
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_conditioning_key(k)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(missing[:5])}")
        if result.unexpected_keys:
            parts.append(f"unexpected key(s) {', '.join(result.unexpected_keys[:5])}")
        raise RuntimeError(f"Error(s) in loading state_dict for TTSModel: {'; '.join(parts)}")
    return [k for k in result.missing_keys if is_conditioning_key(k)]


class WeightAverage:
    """Exponential moving average of a model's weights (and buffers), for synthesis.

    The last step's weights carry the noise of the last few batches; their running average
    speaks more steadily, at no cost to training. The decay ramps up as (1 + n) / (10 + n)
    after n updates, capped at `decay`, so the average of a short run is not dragged back to
    the random initial weights. Kept in float32 whatever the model trains in.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be between 0 and 1, not {decay}")
        self.decay = float(decay)
        self.reset(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start again from the model's current weights (after a rollback or a restart)."""
        self.updates = 0
        self.weights = {
            k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            avg = self.weights[k]
            if avg.is_floating_point():
                avg.lerp_(v.detach().float(), 1.0 - decay)
            else:
                avg.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.weights = {
            k: v.float() if v.is_floating_point() else v for k, v in state["weights"].items()
        }
