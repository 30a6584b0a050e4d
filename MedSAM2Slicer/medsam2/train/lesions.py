"""Synthetic lesions written into a real CT: small objects whose start and end are known along every axis.

The labelled training volumes hold few objects under 10 ml, and their last slices are slivers that training
calls absent (BENCHMARKS 4i), so the memory never learns where a small object ends, the main failure of the
held-out small structures and of the real lesions issue 17 describes. A lesion written into the CT has an end
on every axis that the image shows, and any number of them can be made.

Each lesion is a randomly rotated ellipsoid (diameters 15-35 mm; from about 19 mm on, its largest slice at
1.4 mm is an object the training recipe's ``--min-object-px 150`` prompts), placed where the CT is lung or soft
tissue, away from the body's edge, from bone and from other lesions:

- in lung: a solid nodule, -100 to +60 HU;
- in soft tissue: the surrounding tissue's median +-25 to 80 HU (hypo- or hyperdense, as in liver or kidney
  lesions on contrast CT).

Its edge is blurred over about a voxel and it carries the noise of the tissue around it, so that it is not
found by a perfectly sharp edge alone. The label map holds the lesions only (1..n); the anatomy stays in the
source the CT comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

LUNG_HU = (-950.0, -500.0)
SOFT_TISSUE_HU = (-100.0, 150.0)


@dataclass(frozen=True)
class LesionOptions:
    """``count`` lesions of ``diameter_mm`` (smallest, largest) with a fixed ``seed``."""

    count: int = 80
    diameter_mm: tuple[float, float] = (15.0, 35.0)
    seed: int = 17


def insert_lesions(
    volume_hu: np.ndarray, spacing_mm: float, options: LesionOptions
) -> tuple[np.ndarray, np.ndarray]:
    """``volume_hu`` ``[Z, Y, X]`` (isotropic ``spacing_mm``) with lesions -> (new volume, uint16 labels).

    The input is not modified. Fewer than ``options.count`` lesions are written when the volume has no room
    for more; raises ``ValueError`` when it has none.
    """
    rng = np.random.default_rng(options.seed)
    volume = np.asarray(volume_hu, dtype=np.float32).copy()
    labels = np.zeros(volume.shape, np.uint16)
    # Filled slice by slice: in 3D the lungs reach the volume's edge through the airways and are not holes.
    solid = ndi.binary_opening(volume > -500, iterations=2)
    body = np.stack([ndi.binary_fill_holes(axial) for axial in solid])
    inside = ndi.binary_erosion(body, iterations=max(1, round(10 / spacing_mm)))
    lung = inside & (volume > LUNG_HU[0]) & (volume < LUNG_HU[1])
    soft = inside & (volume > SOFT_TISSUE_HU[0]) & (volume < SOFT_TISSUE_HU[1])
    places = [p for p in (np.argwhere(lung), np.argwhere(soft)) if len(p)]
    if not places:
        raise ValueError("no lung or soft tissue inside the body to write lesions into")
    written = 0
    for _ in range(options.count * 20):
        if written == options.count:
            break
        # Lung and soft tissue take turns: by volume alone, soft tissue would get nearly every lesion.
        candidates = places[written % len(places)]
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(*options.diameter_mm) / 2 / spacing_mm * rng.uniform(0.75, 1.25, size=3)
        if _write_lesion(volume, labels, centre, radii, _rotation(rng), lung, rng, written + 1):
            written += 1
    if not written:
        raise ValueError("no room for a lesion away from the body's edge, bone and other lesions")
    return volume, labels


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _write_lesion(
    volume: np.ndarray,
    labels: np.ndarray,
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    lung: np.ndarray,
    rng: np.random.Generator,
    value: int,
) -> bool:
    """Write one lesion in place; ``False`` (nothing written) where it would leave the volume or touch bone,
    air outside the lungs or another lesion."""
    reach = int(np.ceil(radii.max())) + 2
    lo, hi = centre - reach, centre + reach + 1
    if (lo < 0).any() or (hi > np.array(volume.shape)).any():
        return False
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1) - centre
    # Distance in units of the ellipsoid: 1 on its surface.
    distance = np.sqrt((((grid @ rotation) / radii) ** 2).sum(-1))
    region = distance <= 1
    surroundings = (distance > 1) & (distance <= 1.5)
    around = volume[box][surroundings]
    if labels[box][distance <= 1.5].any() or (around > 300).any():
        return False
    in_lung = lung[tuple(centre)]
    if not in_lung and (around < -300).any():
        return False
    if in_lung:
        density, noise = rng.uniform(-100, 60), 15.0
    else:
        sign = rng.choice([-1, 1])
        density = float(np.median(around)) + sign * rng.uniform(25, 80)
        noise = float(np.clip(np.std(around), 5.0, 30.0))
    lesion = density + rng.normal(0, noise, size=region.shape)
    weight = np.where(surroundings | region, 1 / (1 + np.exp((distance - 1) / 0.08)), 0.0)
    volume[box] = volume[box] * (1 - weight) + lesion * weight
    labels[box][region] = value
    return True
