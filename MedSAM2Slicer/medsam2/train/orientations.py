"""What the four further orientations change: method (i) against method (iii), voxel by voxel.

Method (iii) is exactly the first pass of method (i): the prompt axis, tracked in both directions with the
self-sorting memory. Method (i) then lets the two further axes vote (:mod:`medsam2.volume`). Every voxel where
their masks differ is therefore the further axes' doing, and whether it was right is known from the reference.
Issue 17 asks that six orientations pay off on average, or that the table show where they lose and why; this is
that table's material. Seeded and guided by the first pass, the further axes mostly remove voxels: that helps a
structure the first pass over-segments and costs one it under-segments.
"""

from __future__ import annotations

import numpy as np

from .evaluate import METHODS

SIX, TWO = METHODS[0], METHODS[2]


def extra_axes_effect(six: np.ndarray, two: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    """Voxels the further axes removed from the first pass's mask ``two`` and added to it, giving ``six``,
    split by whether ``reference`` holds them (all ``[Z, Y, X]`` bool)."""
    six, two, reference = (np.asarray(a, bool) for a in (six, two, reference))
    removed, added = two & ~six, six & ~two
    return {
        "true_removed": int((removed & reference).sum()),
        "false_removed": int((removed & ~reference).sum()),
        "true_added": int((added & reference).sum()),
        "false_added": int((added & ~reference).sum()),
    }


def summarize_extra_axes(volumes: dict) -> dict:
    """Over the structures of ``volumes`` (``evaluate`` results with ``extra_axes``; the small structures
    apart): how many six orientations improve and worsen, and the mean Dice change where the first pass
    over-segments (volume ratio > 1) and where it under-segments."""
    changes: dict[str, list[float]] = {"over": [], "under": []}
    for v in volumes.values():
        for name in v.get("extra_axes", {}):
            if name not in v["scores"]:
                continue
            s = v["scores"][name]
            side = "over" if s[TWO]["volume_ratio"] > 1 else "under"
            changes[side].append(s[SIX]["dice"] - s[TWO]["dice"])
    every = changes["over"] + changes["under"]
    if not every:
        return {}
    return {
        "structures": len(every),
        "better": sum(c > 0 for c in every),
        "worse": sum(c < 0 for c in every),
        "mean_dice_change": round(float(np.mean(every)), 4),
        **{
            f"where_first_pass_{side}_segments": {
                "structures": len(c),
                "mean_dice_change": round(float(np.mean(c)), 4) if c else None,
            }
            for side, c in changes.items()
        },
    }


def extra_axes_markdown(results: dict) -> str:
    """Per structure: (iii)'s Dice and volume ratio, (i)'s Dice, and the voxels the further axes removed and
    added, true and false; empty when the results carry no ``extra_axes``."""
    lines = [
        "Six orientations against two: what the further axes changed in the first pass's mask (voxels;"
        " true: in the reference):",
        "",
        "| volume | structure | (iii) Dice | (iii) volume ratio | (i) Dice | true removed | false removed"
        " | true added | false added |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = 0
    for volume, v in results["volumes"].items():
        for name, effect in v.get("extra_axes", {}).items():
            s = v["scores"].get(name) or v["small_scores"][name]
            lines.append(
                f"| {volume} | {name} | {s[TWO]['dice']:.3f} | {s[TWO]['volume_ratio']:.2f} |"
                f" {s[SIX]['dice']:.3f} | {effect['true_removed']} | {effect['false_removed']} |"
                f" {effect['true_added']} | {effect['false_added']} |"
            )
            rows += 1
    summary = results.get("summary", {}).get("extra_axes")
    if summary:
        over = summary["where_first_pass_over_segments"]
        under = summary["where_first_pass_under_segments"]
        lines += [
            "",
            f"Over the {summary['structures']} structures: six orientations better on {summary['better']},"
            f" worse on {summary['worse']}, mean Dice change {summary['mean_dice_change']:+.4f};"
            f" {_change(over)} where the first pass over-segments, {_change(under)} where it under-segments.",
        ]
    return "\n".join(lines) + "\n" if rows else ""


def _change(group: dict) -> str:
    if group["mean_dice_change"] is None:
        return "no structure"
    return f"{group['mean_dice_change']:+.4f} on {group['structures']}"
