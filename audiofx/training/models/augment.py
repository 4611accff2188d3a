"""Augmentations on whole batches of features, on the batch's own device.

Every function takes a batch x of shape (B, C, bins, T), works on all samples at once (no
Python loop over samples) and draws its randomness from an explicit ``torch.Generator``:
the same generator state gives the same result. The generator may live on the CPU or on
the batch's device; the few random numbers are drawn where the generator is and moved to
the batch (a handful of values per sample, so the copy is negligible).

Inputs are never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers drawn from ``generator`` (on its device), on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randint(high: torch.Tensor | int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Integers uniform in [0, high) (high may vary per element), int64 on ``device``."""
    high_t = torch.as_tensor(high, device=device, dtype=torch.float32)
    return (_rand(shape, generator, device) * high_t).floor().long().clamp_min(0)


def _band_mask(batch: int, size: int, masks: int, width: int, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """(batch, size) bool: the union of ``masks`` bands per sample, each of a width drawn
    uniformly from [0, width] and a start uniform over the positions where it fits."""
    if masks <= 0 or width <= 0 or size == 0:
        return torch.zeros((batch, size), dtype=torch.bool, device=device)
    width = min(width, size)
    w = _randint(width + 1, (batch, masks), generator, device)
    start = _randint(size - w + 1, (batch, masks), generator, device)
    pos = torch.arange(size, device=device).view(1, 1, size)
    inside = (pos >= start.unsqueeze(-1)) & (pos < (start + w).unsqueeze(-1))
    return inside.any(dim=1)


def spec_augment(x: torch.Tensor, time_masks: int = 2, time_width: int = 20, freq_masks: int = 2,
                 freq_width: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment time and frequency masking (Park et al. 2019), independent per sample.

    Each mask has a width uniform in [0, width] and a uniform start; masks may overlap. The
    same bands are masked in every channel of a sample (the channels share their time axis
    and mel bins).

    Fill value: the mean of the sample's own channel (over bins and frames), not zero. Park
    et al. fill with zero on features normalised to mean zero, so zero *is* the mean there;
    our stored log-mels are not normalised (log(mel + 1e-6) sits around -14 for silence), so
    a literal zero would paint a loud artificial band. The per-(sample, channel) mean is
    the same choice for normalised inputs, and stays neutral when channels differ in level
    (e.g. the stft_bands kind, where channels are different frequency bands).
    """
    b, _, f, t = x.shape
    fill = x.mean(dim=(2, 3), keepdim=True, dtype=torch.float32).to(x.dtype)
    tmask = _band_mask(b, t, time_masks, time_width, generator, x.device)
    fmask = _band_mask(b, f, freq_masks, freq_width, generator, x.device)
    mask = tmask.view(b, 1, 1, t) | fmask.view(b, 1, f, 1)
    return torch.where(mask, fill, x)


def random_time_crop(x: torch.Tensor, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop every sample to ``frames`` frames at its own random offset (one gather)."""
    b, c, f, t = x.shape
    if frames > t or frames < 1:
        raise ValueError(f"cannot crop {t} frames to {frames}")
    if frames == t:
        return x.clone()
    offset = _randint(t - frames + 1, (b,), generator, x.device)
    idx = offset.view(b, 1) + torch.arange(frames, device=x.device).view(1, frames)
    return torch.gather(x, 3, idx.view(b, 1, 1, frames).expand(b, c, f, frames))


def random_time_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Roll every sample circularly along time by its own shift, uniform in [-max_shift, max_shift]
    (sample i becomes ``torch.roll(x[i], shift[i], dims=-1)``)."""
    b, c, f, t = x.shape
    if max_shift <= 0:
        return x.clone()
    shift = _randint(2 * max_shift + 1, (b,), generator, x.device) - max_shift
    idx = (torch.arange(t, device=x.device).view(1, t) - shift.view(b, 1)) % t
    return torch.gather(x, 3, idx.view(b, 1, 1, t).expand(b, c, f, t))


def random_freq_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every sample along the frequency bins by its own integer, uniform in
    [-max_shift, max_shift]; the bins shifted in repeat the edge bin. On mel bins a shift is
    roughly a pitch and formant shift (a constant ratio in frequency): a view that changes the
    voice or the tuning of a sound but not what is said or played."""
    b, c, f, t = x.shape
    if max_shift <= 0:
        return x.clone()
    shift = _randint(2 * max_shift + 1, (b,), generator, x.device) - max_shift
    idx = (torch.arange(f, device=x.device).view(1, f) - shift.view(b, 1)).clamp(0, f - 1)
    return torch.gather(x, 2, idx.view(b, 1, f, 1).expand(b, c, f, t))


def random_resized_crop(x: torch.Tensor, min_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop every sample to its own random region, a share uniform in [min_scale, 1] of the
    bins and, independently, of the frames, at a uniform position, and resize it back to the
    whole (bins, frames) bilinearly (one ``grid_sample``): a time stretch and a shift and
    stretch along the mel axis (pitch and formants) in one view, the spectrogram form of
    SimCLR's random resized crop (BYOL-A uses it on log-mels). Channels are cropped alike."""
    b, c, f, t = x.shape
    if min_scale >= 1:
        return x.clone()
    r = _rand((b, 4), generator, x.device)
    sh = min_scale + (1 - min_scale) * r[:, 0]  # shares of the bins and of the frames
    sw = min_scale + (1 - min_scale) * r[:, 1]
    cy = (1 - sh) * (2 * r[:, 2] - 1)  # the crop's centre in [-1, 1] coordinates, inside the input
    cx = (1 - sw) * (2 * r[:, 3] - 1)
    theta = torch.zeros((b, 2, 3), device=x.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = torch.nn.functional.affine_grid(theta, [b, c, f, t], align_corners=False)
    return torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False).to(x.dtype)


EQ_BANDS = 7  # the random equaliser's gains: at 7 centres spread evenly over the bins, linear between


def random_level_eq(x: torch.Tensor, gain_db: float, eq_db: float, per_db: float | torch.Tensor = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A random level and a random equaliser per sample: what a change of microphone, room or
    recording level does to a log spectrogram. Each sample gets a gain uniform in
    [-gain_db, gain_db] dB and a smooth curve over the bins through ``EQ_BANDS`` gains, each
    uniform in [-eq_db, eq_db] dB (the first at the lowest bin, the last at the highest,
    linear between them), the same over every frame and channel. On a log spectrogram a gain is
    an added constant: ``per_db`` says how much one dB adds to ``x`` (a float, or per channel
    (1, C, 1, 1): the log-power units of a dB divided by each channel's standard deviation when
    ``x`` is standardised)."""
    b, _, f, _ = x.shape
    if gain_db <= 0 and eq_db <= 0:
        return x.clone()
    r = _rand((b, 1 + EQ_BANDS), generator, x.device) * 2 - 1
    gain, bands = r[:, :1] * gain_db, r[:, 1:] * eq_db
    curve = torch.nn.functional.interpolate(bands.unsqueeze(1), size=f, mode="linear", align_corners=True)
    offset_db = (gain.unsqueeze(-1) + curve).view(b, 1, f, 1)  # (B, 1, bins, 1): every channel and frame alike
    return (x.float() + offset_db * torch.as_tensor(per_db, device=x.device, dtype=torch.float32)).to(x.dtype)


def _beta(alpha: float, n: int, generator: torch.Generator | None) -> np.ndarray:
    """n draws of Beta(alpha, alpha). torch's Beta takes no generator, so a numpy generator is
    seeded from ``generator``: the draws still follow its state exactly."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu").item())
    return np.random.default_rng(seed).beta(alpha, alpha, size=n)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.2, n_classes: int | None = None,
          generator: torch.Generator | None = None, return_weights: bool = False):
    """mixup (Zhang et al. 2018): x_i' = lam_i x_i + (1 - lam_i) x_perm(i), same for targets.

    lam_i ~ Beta(alpha, alpha), one per sample; perm is one random permutation of the batch.
    ``y`` is (B,) class indices (made one-hot with ``n_classes``, required then) or (B, K)
    multi-hot / soft targets (mixed as floats). Returns (x_mixed, y_soft), y_soft float32 (B, K);
    with ``return_weights`` also (lam, perm) as used. For one-hot targets each row of y_soft
    sums to 1 and holds lam_i on y_i and 1 - lam_i on y_perm(i) (1 when they are the same class).
    """
    b = x.shape[0]
    if y.dim() == 1:
        if n_classes is None:
            raise ValueError("mixup of class indices needs n_classes")
        targets = torch.nn.functional.one_hot(y.long(), n_classes).float()
    else:
        targets = y.float()
    lam = torch.from_numpy(_beta(alpha, b, generator)).float().to(x.device)
    gen_device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(b, generator=generator, device=gen_device).to(x.device)
    lx = lam.view(b, *([1] * (x.dim() - 1))).to(x.dtype)
    x_mixed = lx * x + (1 - lx) * x.index_select(0, perm)
    ly = lam.view(b, 1)
    y_soft = ly * targets + (1 - ly) * targets.index_select(0, perm)
    if return_weights:
        return x_mixed, y_soft, lam, perm
    return x_mixed, y_soft


@dataclass
class Augment:
    """Which augmentations to apply to a training batch, in this order: resized crop, time
    crop, time shift, frequency shift, level and equaliser, mixup, SpecAugment (masks last, so
    a masked band stays fully masked).

    Every step is off by default. With ``mixup`` > 0 (its Beta alpha) the targets come back
    as float32 soft targets (B, n_classes); otherwise y is returned as given.
    """

    spec_augment: bool = False
    time_masks: int = 2
    time_width: int = 20
    freq_masks: int = 2
    freq_width: int = 16
    time_crop: int | None = None
    time_shift: int = 0
    freq_shift: int = 0
    mixup: float = 0.0
    n_classes: int | None = None
    resized_crop: float = 0.0  # the smallest share of bins and frames a resized crop keeps; 0 is off
    gain_db: float = 0.0  # a random level of up to this many dB either way; 0 is off
    eq_db: float = 0.0  # a random equaliser of up to this many dB either way per band; 0 is off
    per_db: float | torch.Tensor = 1.0  # what one dB adds to the batch (random_level_eq)

    @property
    def active(self) -> bool:
        return self.changes()

    def changes(self, frames: int | None = None) -> bool:
        """Whether a batch comes out different from how it went in: some step is on and does
        something (masks of width 0, or a crop of all ``frames`` frames, do not)."""
        masked = self.spec_augment and ((self.time_masks > 0 and self.time_width > 0)
                                        or (self.freq_masks > 0 and self.freq_width > 0))
        cropped = self.time_crop is not None and (frames is None or self.time_crop < frames)
        return bool(masked or cropped or self.time_shift > 0 or self.freq_shift > 0 or self.mixup > 0
                    or 0 < self.resized_crop < 1 or self.gain_db > 0 or self.eq_db > 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if 0 < self.resized_crop < 1:
            x = random_resized_crop(x, self.resized_crop, generator)
        if self.time_crop:
            x = random_time_crop(x, self.time_crop, generator)
        if self.time_shift > 0:
            x = random_time_shift(x, self.time_shift, generator)
        if self.freq_shift > 0:
            x = random_freq_shift(x, self.freq_shift, generator)
        if self.gain_db > 0 or self.eq_db > 0:
            x = random_level_eq(x, self.gain_db, self.eq_db, self.per_db, generator)
        if self.mixup > 0:
            x, y = mixup(x, y, self.mixup, self.n_classes, generator)
        if self.spec_augment:
            x = spec_augment(x, self.time_masks, self.time_width, self.freq_masks, self.freq_width, generator)
        return x, y
