"""Fine-tuning HiFi-GAN on one dataset, starting from the universal generator.

    VocoderTrainer(VocoderConfig(...), cache_dir, out_dir, callbacks, audio_files=...).run()

The generator learns to turn this dataset's mels into this dataset's audio. With
`acoustic_checkpoint` set, the mels are the acoustic model's own, teacher-forced (ground-truth
durations from its aligner, ground-truth pitch and energy: the FastPitch / NeMo recipe), so the
vocoder learns the small errors of the mels it will be given; otherwise the cache's real mels.

One step, in plain sight: render random segments; discriminator step (LSGAN on real vs
generated, multi-period + multi-scale); generator step (adversarial + 2 x feature matching +
45 x mel L1, the paper's weights); each optimiser step guarded by its own StepGuard (a
non-finite or spiking loss skips the step, repeated skips roll back to the last checkpoint and
lower the learning rate). bf16 autocast on CUDA only. The outside world sees the run through
`training.trainer.Callbacks`, as for acoustic runs.

Exact resume: a checkpoint holds both networks, both optimisers, guards, RNG states and the
position in the data; the segment order and crop offsets depend only on (seed, epoch, batch).

The feature cache keeps features, not audio, so the trainer reads the recordings again
(`audio_files` maps utterance ids to files, or the cache's records carry `audio_path`) through
the same trim and loudness steps as preprocessing, and checks each against its cached frame
count.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import audio as audio_lib
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import collate, read_items, read_meta
from training.device import select_device
from training.guard import StepGuard
from training.trainer import Callbacks, Sample, TrainResult, rng_state, set_rng_state
from training.vocoder_model import (
    UNIVERSAL,
    Discriminators,
    GeneratorConfig,
    VocoderError,
    adversarial_loss,
    build_generator,
    check_mel_layout,
    discriminator_loss,
    feature_matching_loss,
    pretrained_generator,
    wheel_config,
)

CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt$")
SAMPLE_COUNT = 2
MAX_EVAL_UTTERANCES = 8


@dataclass
class VocoderConfig:
    steps: int = 2000
    batch_size: int = 16
    segment_size: int = 8192  # samples per training segment (32 frames); tests use less
    learning_rate: float = 2e-4
    adam_beta1: float = 0.8
    adam_beta2: float = 0.99
    weight_decay: float = 0.01
    lr_decay: float = 0.999  # per epoch, as in the paper
    weight_mel: float = 45.0
    weight_feature_matching: float = 2.0
    weight_adversarial: float = 1.0
    grad_clip_norm: float = 1000.0  # a backstop; the guard watches the norm before clipping
    spike_threshold: float = 3.0  # GAN losses swing more than an acoustic model's
    max_consecutive_skips: int = 5
    rollback_lr_factor: float = 0.5
    discriminator_width: float = 1.0  # channel scale of the discriminators; 1.0 is the paper's
    init: str = UNIVERSAL  # "universal" or the path of a vocoder checkpoint to continue from
    acoustic_checkpoint: str | None = None  # teacher-forced mels from this model, else real mels
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 < self.learning_rate <= 1e-2:
            raise ValueError(f"learning_rate must be in (0, 0.01], not {self.learning_rate:g}")
        if not 0 < self.discriminator_width <= 1:
            raise ValueError("discriminator_width must be in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- data


@dataclass
class Utterance:
    id: str
    speaker: str
    text: str
    mel: torch.Tensor  # [n_mels, frames], what the generator is given
    real_mel: torch.Tensor  # [n_mels, frames], the recording's own (for the eval loss)
    wav: torch.Tensor  # [frames * hop], the target, delayed by hop // 2 (see vocoder_model)


def recording(path: str | Path, cfg: audio_lib.AudioConfig) -> torch.Tensor:
    """A recording exactly as preprocessing made the features from it."""
    wav, _ = audio_lib.load_audio(path, cfg.sample_rate)
    return audio_lib.normalise_loudness(audio_lib.trim_silence(wav, cfg.sample_rate))


def target_waveform(wav: torch.Tensor, frames: int, hop: int) -> torch.Tensor:
    """The waveform the generator should render from `frames` centred frames: delayed by half
    a hop (the universal generator's convention) and cut or padded to frames * hop."""
    wav = F.pad(wav, (hop // 2, 0))
    return F.pad(wav, (0, max(0, frames * hop - wav.numel())))[: frames * hop]


class SegmentBatches:
    """Random fixed-length segments, a pure function of (seed, epoch, batch index)."""

    def __init__(
        self, utterances: list[Utterance], batch_size: int, segment_frames: int, seed: int
    ):
        self.utterances = utterances
        self.batch_size = min(batch_size, len(utterances))
        self.segment_frames = segment_frames
        self.seed = seed

    def batches_per_epoch(self) -> int:
        return len(self.utterances) // self.batch_size

    def batch(self, epoch: int, index: int, hop: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.utterances), generator=g).tolist()
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        crop = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + index)
        seg = self.segment_frames
        mels, wavs = [], []
        for i in chosen:
            u = self.utterances[i]
            frames = u.mel.shape[1]
            start = int(torch.randint(0, max(1, frames - seg + 1), (1,), generator=crop))
            mel = u.mel[:, start : start + seg]
            wav = u.wav[start * hop : (start + seg) * hop]
            if mel.shape[1] < seg:  # a short utterance is padded with silence
                mel = F.pad(mel, (0, seg - mel.shape[1]), value=math.log(audio_lib.LOG_FLOOR))
                wav = F.pad(wav, (0, seg * hop - wav.numel()))
            mels.append(mel)
            wavs.append(wav)
        return torch.stack(mels), torch.stack(wavs)[:, None]


def teacher_forced_mels(
    checkpoint: str | Path, cache_dir: Path, items: list[dict], device: torch.device
) -> dict[str, torch.Tensor]:
    """The acoustic model's mels with ground-truth durations (its aligner), pitch and energy."""
    from training.data import FeatureDataset
    from training.model import ModelConfig, TTSModel

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    meta = read_meta(cache_dir)
    if "model_config" not in ckpt or "symbols" not in ckpt:
        raise VocoderError(f"{Path(checkpoint).name} is not an acoustic-model checkpoint")
    if list(ckpt["symbols"]) != list(meta["symbols"]):
        raise VocoderError(
            f"{Path(checkpoint).name} was trained on another symbol table than this dataset's "
            "feature cache; pick a checkpoint trained on this dataset"
        )
    model = TTSModel(ModelConfig.from_dict(ckpt["model_config"]), len(meta["symbols"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    dataset = FeatureDataset(cache_dir, "all")
    wanted = {it["id"] for it in items}
    mels = {}
    with torch.no_grad():
        for i, it in enumerate(dataset.items):
            if it["id"] not in wanted:
                continue
            batch = collate([dataset[i]])
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            out = model(batch)
            mels[it["id"]] = out["mel_pred"][0, :, : int(batch["mel_lens"][0])].float().cpu()
    return mels


# ----------------------------------------------------------------------------- the trainer


class VocoderTrainer:
    def __init__(
        self,
        cfg: VocoderConfig,
        cache_dir,
        out_dir,
        callbacks: Callbacks | None = None,
        resume: bool = False,
        audio_files: Mapping[str, str | Path] | None = None,
    ):
        cfg.check()
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.callbacks = callbacks or Callbacks()
        self.device = select_device(cfg.device)
        self.meta = read_meta(self.cache_dir)
        self.audio = audio_lib.AudioConfig.from_dict(self.meta["audio"])
        self.hop = self.audio.hop_length
        self.warnings: list[str] = []
        torch.manual_seed(cfg.seed)

        # Networks: the generator in its trainable (weight-normed) form.
        self.generator_config, wheel_layout = wheel_config()
        check_mel_layout(wheel_layout, self.audio, "HiFi-GAN universal")
        if cfg.init == UNIVERSAL:
            self.generator = pretrained_generator(UNIVERSAL)
        else:
            ckpt = load_checkpoint(cfg.init)
            if ckpt.get("kind") != "vocoder":
                raise VocoderError(f"init {cfg.init}: not a vocoder checkpoint")
            self.generator_config = GeneratorConfig.from_dict(ckpt["model_config"])
            check_mel_layout(audio_lib.AudioConfig.from_dict(ckpt["audio"]), self.audio, cfg.init)
            self.generator = build_generator(self.generator_config)
            self.generator.load_state_dict(ckpt["model"])
        if self.generator_config.hop_length != self.hop:
            raise VocoderError(
                f"the generator upsamples x{self.generator_config.hop_length}, the mels have "
                f"hop {self.hop}"
            )
        self.generator.to(self.device)
        self.discriminators = Discriminators(cfg.discriminator_width).to(self.device)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.opt_g = torch.optim.AdamW(
            self.generator.parameters(), cfg.learning_rate, betas, weight_decay=cfg.weight_decay
        )
        self.opt_d = torch.optim.AdamW(
            self.discriminators.parameters(),
            cfg.learning_rate,
            betas,
            weight_decay=cfg.weight_decay,
        )
        self.guard_g, self.guard_d = (
            StepGuard(cfg.spike_threshold, cfg.max_consecutive_skips) for _ in range(2)
        )
        self.lr_scale = 1.0
        # The mel loss of the paper is taken over the full band, not the input's 0-8 kHz.
        self.loss_mel_cfg = audio_lib.AudioConfig(
            **{**self.audio.to_dict(), "f_max": self.audio.sample_rate / 2}
        )

        # Data.
        self.train_set = self._utterances("train", audio_files)
        if not self.train_set:
            raise ValueError(f"{self.cache_dir}: no training utterance has a readable recording")
        self.val_set = self._utterances("val", audio_files)[:MAX_EVAL_UTTERANCES]
        if not self.val_set:
            self.warnings.append("the cache has no validation split; evaluating on training data")
            self.val_set = self.train_set[:MAX_EVAL_UTTERANCES]
        self.segments = SegmentBatches(
            self.train_set, cfg.batch_size, max(1, cfg.segment_size // self.hop), cfg.seed
        )
        self.epoch, self.batch_in_epoch = 0, 0

        self.step = 0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_checkpoint: str | None = None
        self.last_saved_step = -1
        self.last_eval_step = -1
        self.tried_rollbacks: set[str] = set()
        self.pending_events: list[dict] = []
        if resume:
            self._resume()

    # ------------------------------------------------------------------ setup

    def _utterances(self, split: str, audio_files) -> list[Utterance]:
        items = read_items(self.cache_dir, split)
        teacher = {}
        if self.cfg.acoustic_checkpoint and items:
            teacher = teacher_forced_mels(
                self.cfg.acoustic_checkpoint, self.cache_dir, items, self.device
            )
        out, missing, changed = [], 0, 0
        for it in items:
            path = (audio_files or {}).get(it["id"]) or it.get("audio_path")
            if not path or not Path(path).is_file():
                missing += 1
                continue
            wav = recording(path, self.audio)
            frames = int(it["n_frames"])
            if audio_lib.n_frames(wav.numel(), self.audio) != frames:
                changed += 1  # the file changed since its features were made
                continue
            feats = torch.load(self.cache_dir / it["feats"], map_location="cpu", weights_only=True)
            real = feats["mel"].float()
            out.append(
                Utterance(
                    id=it["id"],
                    speaker=it["speaker"],
                    text=it["text"],
                    mel=teacher.get(it["id"], real),
                    real_mel=real,
                    wav=target_waveform(wav, frames, self.hop),
                )
            )
        if missing:
            self.warnings.append(
                f"{missing} {split} utterance(s) have no recording to read; skipped"
            )
        if changed:
            self.warnings.append(
                f"{changed} {split} recording(s) changed since preprocessing; skipped"
            )
        return out

    def autocast(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_at(self) -> float:
        return self.cfg.learning_rate * self.lr_scale * self.cfg.lr_decay**self.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_in_epoch >= self.segments.batches_per_epoch():
            self.epoch += 1
            self.batch_in_epoch = 0
        mel, wav = self.segments.batch(self.epoch, self.batch_in_epoch, self.hop)
        self.batch_in_epoch += 1
        return mel.to(self.device), wav.to(self.device)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        status = "finished"
        self.generator.train()
        self.discriminators.train()
        while self.step < self.cfg.steps:
            if self.callbacks.should_stop():
                status = "stopped"
                break
            self.train_step()
            if self.step % self.cfg.eval_every == 0:
                self.evaluate()
            if self.step % self.cfg.checkpoint_every == 0:
                self.save()
        if status == "finished" and self.last_eval_step != self.step:
            self.evaluate()
        if self.last_saved_step != self.step:
            self.save()
        return TrainResult(
            status=status,
            step=self.step,
            best_val_loss=self.best_val_loss,
            last_checkpoint=self.last_checkpoint,
            param_count=sum(p.numel() for p in self.generator.parameters()),
            warnings=list(self.warnings),
        )

    def train_step(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        lr = self.lr_at()
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        mel, wav = self.next_batch()

        with self.autocast():
            fake = self.generator(mel)
        fake = fake.float()

        # Discriminators: real towards 1, generated (detached) towards 0.
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            real_scores, _ = self.discriminators(wav)
            fake_scores, _ = self.discriminators(fake.detach())
            loss_d = discriminator_loss(real_scores, fake_scores)
        loss_d.backward()
        norm_d = float(
            torch.nn.utils.clip_grad_norm_(self.discriminators.parameters(), cfg.grad_clip_norm)
        )
        verdict_d = self.guard_d.check(loss_d.item(), norm_d)
        if not verdict_d.skip:
            self.opt_d.step()

        # Generator: fool the judges, match their features, and match the mel.
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            _, real_features = self.discriminators(wav)
            fake_scores, fake_features = self.discriminators(fake)
            loss_adv = adversarial_loss(fake_scores)
            loss_fm = feature_matching_loss(real_features, fake_features)
        loss_mel = F.l1_loss(
            audio_lib.mel_spectrogram(fake[:, 0], self.loss_mel_cfg),
            audio_lib.mel_spectrogram(wav[:, 0], self.loss_mel_cfg),
        )
        loss_g = (
            cfg.weight_adversarial * loss_adv
            + cfg.weight_feature_matching * loss_fm
            + cfg.weight_mel * loss_mel
        )
        loss_g.backward()
        norm_g = float(
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), cfg.grad_clip_norm)
        )
        verdict_g = self.guard_g.check(loss_g.item(), norm_g)
        if not verdict_g.skip:
            self.opt_g.step()
        # The generator step left gradients in the discriminators; they must not leak into
        # the next discriminator step.
        self.opt_d.zero_grad(set_to_none=True)
        self.step += 1

        events, self.pending_events = self.pending_events, []
        for who, verdict, loss, norm in (
            ("generator", verdict_g, loss_g.item(), norm_g),
            ("discriminator", verdict_d, loss_d.item(), norm_d),
        ):
            if verdict.skip:
                events.append(
                    {
                        "kind": "skip",
                        "step": self.step,
                        "message": f"{who} step skipped: {verdict.reason}",
                        "data": {"loss": _finite_or_none(loss), "grad_norm": _finite_or_none(norm)},
                    }
                )
        if verdict_g.rollback or verdict_d.rollback:
            events.append(self.rollback())

        step_time = time.perf_counter() - started
        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            "loss/total": loss_g.item(),
            "loss/generator": loss_g.item(),
            "loss/discriminator": loss_d.item(),
            "loss/mel": loss_mel.item(),
            "loss/feature_matching": loss_fm.item(),
            "loss/adversarial": loss_adv.item(),
            "grad_norm": norm_g,
            "grad_norm/generator": norm_g,
            "grad_norm/discriminator": norm_d,
            "lr": lr,
            "time/step": step_time,
            "samples_per_s": mel.shape[0] / step_time if step_time > 0 else 0.0,
            "guard/skipped": float(self.guard_g.skipped + self.guard_d.skipped),
            "guard/rollbacks": float(self.guard_g.rollbacks + self.guard_d.rollbacks),
            "events": events,
        }
        if self.step % cfg.log_every == 0 or events:
            self._write_metrics(metrics)
            self.callbacks.on_step(metrics)
        return metrics

    def rollback(self) -> dict:
        """Back to the newest checkpoint not yet tried (else the starting weights are kept and
        only the learning rate drops); the data position goes on, so the fault is not replayed."""
        target = next(
            (p for p in self._checkpoints()[::-1] if str(p) not in self.tried_rollbacks), None
        )
        source, source_step = "the current weights", self.step
        if target is not None:
            self.tried_rollbacks.add(str(target))
            ckpt = load_checkpoint(target, map_location=self.device)
            self._load_networks(ckpt)
            source, source_step = target.name, int(ckpt["step"])
        self.lr_scale *= self.cfg.rollback_lr_factor
        return {
            "kind": "rollback",
            "step": self.step,
            "message": (
                f"{self.cfg.max_consecutive_skips} bad steps in a row: rolled back to {source} "
                f"(step {source_step}); learning rate now x{self.lr_scale:g}"
            ),
            "data": {"to_step": source_step, "lr_scale": self.lr_scale},
        }

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mel L1 of whole validation utterances against their recordings' mels, plus audio."""
        self.generator.eval()
        total, samples = 0.0, []
        for i, u in enumerate(self.val_set):
            with self.autocast():
                wav = self.generator(u.mel[None].to(self.device))[0, 0].float()
            wav = wav[self.hop // 2 :]  # undo the half-hop delay
            mel = audio_lib.mel_spectrogram(wav, self.audio).cpu()
            frames = min(mel.shape[1], u.real_mel.shape[1])
            total += float((mel[:, :frames] - u.real_mel[:, :frames]).abs().mean())
            if i < SAMPLE_COUNT:
                samples.append(
                    Sample(
                        id=u.id,
                        speaker=u.speaker,
                        text=u.text,
                        audio=wav.cpu().numpy().astype(np.float32),
                        sample_rate=self.audio.sample_rate,
                        mel=mel.numpy(),
                    )
                )
        self.generator.train()
        val_loss = total / len(self.val_set)
        self.last_val_loss = val_loss if math.isfinite(val_loss) else None
        improved = self.last_val_loss is not None and (
            self.best_val_loss is None or val_loss < self.best_val_loss
        )
        if improved:
            self.best_val_loss = val_loss
        metrics = {"step": self.step, "val/mel": val_loss, "val/best_mel": self.best_val_loss}
        self.last_eval_step = self.step
        self._write_metrics(metrics)
        self.callbacks.on_eval(metrics, samples)
        if improved:
            self.save(best=True)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def vocoder_dict(self) -> dict:
        """What synthesis needs: the generator and the mel layout it reads."""
        return {
            "kind": "vocoder",
            "model": self.generator.state_dict(),
            "model_config": self.generator_config.to_dict(),
            "audio": self.audio.to_dict(),
            "step": self.step,
            "val_loss": self.last_val_loss,
            "mel_source": "teacher_forced" if self.cfg.acoustic_checkpoint else "real",
            "acoustic_checkpoint": self.cfg.acoustic_checkpoint,
        }

    def checkpoint_dict(self) -> dict:
        return {
            **self.vocoder_dict(),
            "discriminators": self.discriminators.state_dict(),
            "optimizer": {
                "generator": self.opt_g.state_dict(),
                "discriminator": self.opt_d.state_dict(),
            },
            "scheduler": {"lr_scale": self.lr_scale},
            "guard_state": {
                "generator": self.guard_g.state_dict(),
                "discriminator": self.guard_d.state_dict(),
            },
            "rng": rng_state(),
            "data_position": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "config": self.cfg.to_dict(),
            "eval_step": self.last_eval_step,
            "best_val_loss": self.best_val_loss,
        }

    def save(self, best: bool = False) -> str:
        """step_*.pt: everything for resume and rollback (~1 GB at full size); best.pt: the
        generator alone (55 MB), the file synthesis loads as a fine-tuned vocoder."""
        if best:
            path = save_checkpoint(self.ckpt_dir / "best.pt", self.vocoder_dict())
        else:
            path = save_checkpoint(
                self.ckpt_dir / f"step_{self.step:07d}.pt", self.checkpoint_dict()
            )
            self.last_checkpoint = str(path)
            self.last_saved_step = self.step
            for old in self._checkpoints()[: -self.cfg.keep_last]:
                old.unlink(missing_ok=True)
        self.callbacks.on_checkpoint(
            str(path),
            {"step": self.step, "val_loss": self.last_val_loss, "best": best, "kind": "vocoder"},
        )
        return str(path)

    def _checkpoints(self) -> list[Path]:
        found = [
            (int(m.group(1)), p)
            for p in self.ckpt_dir.glob("step_*.pt")
            if (m := CHECKPOINT_NAME.search(p.name))
        ]
        return [p for _, p in sorted(found)]

    def _load_networks(self, ckpt: dict) -> None:
        self.generator.load_state_dict(ckpt["model"])
        self.discriminators.load_state_dict(ckpt["discriminators"])
        self.opt_g.load_state_dict(ckpt["optimizer"]["generator"])
        self.opt_d.load_state_dict(ckpt["optimizer"]["discriminator"])

    def _resume(self) -> bool:
        found = self._checkpoints()
        if not found:
            self.warnings.append(f"nothing to resume in {self.ckpt_dir}; starting from scratch")
            return False
        ckpt = load_checkpoint(found[-1], map_location=self.device)
        if ckpt.get("kind") != "vocoder":
            raise VocoderError(f"cannot resume: {found[-1].name} is not a vocoder checkpoint")
        if ckpt["config"].get("discriminator_width") != self.cfg.discriminator_width:
            raise VocoderError("cannot resume with another discriminator width")
        self._load_networks(ckpt)
        self.lr_scale = float(ckpt["scheduler"]["lr_scale"])
        self.guard_g.load_state_dict(ckpt["guard_state"]["generator"])
        self.guard_d.load_state_dict(ckpt["guard_state"]["discriminator"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["data_position"]["epoch"])
        self.batch_in_epoch = int(ckpt["data_position"]["batch"])
        self.best_val_loss = ckpt.get("best_val_loss")
        self.last_val_loss = ckpt.get("val_loss")
        self.last_eval_step = int(ckpt.get("eval_step", -1))
        self.last_checkpoint = str(found[-1])
        self.last_saved_step = self.step
        set_rng_state(ckpt["rng"])
        self._truncate_metrics(self.step)
        return True

    # ------------------------------------------------------------------ metrics file

    def _write_metrics(self, metrics: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        clean = {k: _finite_or_none(v) for k, v in metrics.items()}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None
