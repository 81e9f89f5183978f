"""Synthetic event recordings of still images, the way N-MNIST was recorded: the image moves along three
short linear saccades (a triangle) in front of an event sensor, which emits an event at a pixel each
time its log intensity has changed by a contrast threshold since that pixel's last event (ON for an
increase, OFF for a decrease).

Whole batches are simulated at once (torch for the sub-pixel shifts, numpy for the events), so the
1797 scikit-learn digits (about 3M events) take one to two seconds on two cores.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tonic.io import events_struct

# Saccade triangle in units of the amplitude, (x, y): right-down, right-up, back left (as N-MNIST).
SACCADE_VERTICES = np.array([[0.0, 0.0], [0.5, 1.0], [1.0, 0.0], [0.0, 0.0]])


@dataclass(frozen=True)
class SaccadeSensor:
    """Sensor and motion parameters.

    Args:
        sensor_size: side of the square sensor in pixels.
        image_size: side the image is resized to on the sensor.
        amplitude: saccade size in pixels (each sample varies it by +-``amplitude_jitter``).
        steps_per_saccade: rendered positions per saccade (finer steps spread events out in time).
        saccade_us: duration of one saccade in microseconds.
        threshold: log-intensity contrast threshold; each pixel's varies by ``threshold_mismatch`` (std,
            relative), like a real sensor's transistor mismatch.
        log_eps: offset of the log so that black pixels have a finite log intensity.
    """

    sensor_size: int = 34
    image_size: int = 28
    amplitude: float = 3.0
    amplitude_jitter: float = 0.2
    steps_per_saccade: int = 6
    saccade_us: int = 100_000
    threshold: float = 0.5
    threshold_mismatch: float = 0.05
    log_eps: float = 0.1

    def __post_init__(self) -> None:
        max_travel = self.amplitude * (1 + self.amplitude_jitter)
        if self.image_size + max_travel > self.sensor_size:
            raise ValueError(
                f"image_size {self.image_size} + saccade travel {max_travel:.1f} does not fit the "
                f"{self.sensor_size}-pixel sensor"
            )
        if self.threshold <= 0 or self.steps_per_saccade < 1:
            raise ValueError("threshold must be > 0 and steps_per_saccade >= 1")

    @property
    def tonic_sensor_size(self) -> tuple[int, int, int]:
        return (self.sensor_size, self.sensor_size, 2)

    @property
    def duration_us(self) -> int:
        return self.saccade_us * (len(SACCADE_VERTICES) - 1)


def saccade_positions(sensor: SaccadeSensor, amplitudes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``[N, 3 * steps + 1, 2]`` image offsets (x, y) along each sample's triangle."""
    frac = np.arange(sensor.steps_per_saccade) / sensor.steps_per_saccade
    legs = [a + (b - a) * frac[:, None] for a, b in itertools.pairwise(SACCADE_VERTICES)]
    path = np.concatenate([*legs, SACCADE_VERTICES[-1:]])  # [steps, 2] in amplitude units
    return starts[:, None, :] + amplitudes[:, None, None] * path[None]


class BilinearShifter:
    """Shows ``canvas`` (``[N, S, S]``) moved by per-sample offsets, bilinear, zeros outside.

    Separable (along x, then y) and gathered with flat ``take``s, which is several times faster than
    fancy indexing or torch on small CPUs. Two zero pixels of padding each side let out-of-range source
    coordinates be clipped onto zeros, so no masking is needed.
    """

    PAD = 2

    def __init__(self, canvas: np.ndarray) -> None:
        self.n, self.size, _ = canvas.shape
        self.padded = np.pad(canvas, ((0, 0), (self.PAD, self.PAD), (self.PAD, self.PAD)))

    def _source(self, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left/upper neighbour index (in padded coordinates) and weight of the right/lower one."""
        src = np.arange(self.size, dtype=np.float32)[None, :] - offset[:, None].astype(np.float32)
        low = np.clip(np.floor(src), -self.PAD, self.size)
        return low.astype(np.intp) + self.PAD, (src - low).clip(0, 1)

    def __call__(self, offsets: np.ndarray) -> np.ndarray:
        """``offsets`` ``[N, 2]`` (dx, dy): output pixel (x, y) shows canvas point (x - dx, y - dy)."""
        n, size, padded_size = self.n, self.size, self.size + 2 * self.PAD
        x0, wx = self._source(offsets[:, 0])
        y0, wy = self._source(offsets[:, 1])
        flat = self.padded.reshape(-1)
        idx = (
            (np.arange(n) * padded_size**2)[:, None, None]
            + (np.arange(padded_size) * padded_size)[None, :, None]
            + x0[:, None, :]
        )
        wx = wx[:, None, :]
        # flat[1:].take(idx) is flat[idx + 1], the right neighbour, without another index array.
        along_x = (1 - wx) * flat.take(idx) + wx * flat[1:].take(idx)  # [N, S + 4, S]
        flat = along_x.reshape(-1)
        idx = (np.arange(n) * padded_size * size)[:, None, None] + y0[:, :, None] * size + np.arange(size)
        wy = wy[:, :, None]
        return (1 - wy) * flat.take(idx) + wy * flat[size:].take(idx)


def simulate_saccade_events(
    images: np.ndarray, sensor: SaccadeSensor, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Events of every image in ``images`` (``[N, h, w]``, intensities in [0, 1]).

    Returns ``(events, offsets)``: one tonic-style structured array (fields x, y, t, p; sorted by sample,
    then time) and ``offsets`` [N + 1] so that sample ``i`` is ``events[offsets[i]:offsets[i + 1]]``.
    """
    n, size = len(images), sensor.sensor_size
    rng = np.random.default_rng(seed)

    # The image at the sensor's top-left corner; each step shows it shifted along the path.
    resized = F.interpolate(
        torch.as_tensor(np.asarray(images), dtype=torch.float32)[:, None],
        size=(sensor.image_size, sensor.image_size),
        mode="bilinear",
        align_corners=False,
    )[:, 0].clamp(0, 1)
    canvas = np.zeros((n, size, size), dtype=np.float32)
    canvas[:, : sensor.image_size, : sensor.image_size] = resized.numpy()

    amplitudes = sensor.amplitude * (1 + rng.uniform(-sensor.amplitude_jitter, sensor.amplitude_jitter, n))
    slack = size - sensor.image_size - amplitudes  # room left for the starting offset
    starts = rng.uniform(0, 1, (n, 2)) * slack[:, None]
    positions = saccade_positions(sensor, amplitudes, starts)
    mismatch = np.clip(1 + sensor.threshold_mismatch * rng.standard_normal((n, size, size)), 0.5, None)
    thresholds = (sensor.threshold * mismatch).astype(np.float32)
    step_us = sensor.saccade_us / sensor.steps_per_saccade

    shift = BilinearShifter(canvas)

    def log_intensity(step: int) -> np.ndarray:
        return np.log(shift(positions[:, step]) + np.float32(sensor.log_eps))

    reference = log_intensity(0)  # the sensor has adapted to the first view: no events for it
    chunks = []
    for step in range(1, positions.shape[1]):
        change = log_intensity(step) - reference
        crossings = np.floor(np.abs(change) / thresholds).astype(np.int64)
        reference += np.sign(change) * crossings * thresholds
        sample, y, x = np.nonzero(crossings)
        count = crossings[sample, y, x]
        on = change[sample, y, x] > 0
        # One event per threshold crossing, each at a random time inside this step; ordered by sample
        # (np.nonzero already is) and then time within this step.
        sample, y, x, on = (np.repeat(v, count) for v in (sample, y, x, on))
        t = ((step - 1 + rng.uniform(0, 1, len(sample))) * step_us).astype(np.int64)
        within = np.argsort(sample * np.int64(sensor.duration_us) + t)
        chunks.append(tuple(v[within] for v in (sample, x, y, t, on)))

    sample, x, y, t, on = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
    # Steps were appended in time order, so a stable sort by sample alone (a radix sort for int16)
    # leaves each sample's events sorted by time.
    order = np.argsort(sample.astype(np.int16 if n < 2**15 else np.int64), kind="stable")
    events = np.empty(len(order), dtype=events_struct)
    events["x"], events["y"], events["t"], events["p"] = x[order], y[order], t[order], on[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(sample, minlength=n))])
    return events, offsets
