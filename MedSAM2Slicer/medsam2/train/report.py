"""The Markdown tables of ``medsam2 train evaluate`` (:mod:`.evaluate`) from its JSON results."""

from __future__ import annotations

import numpy as np

from .corrections import corrections_markdown
from .evaluate import METHODS, PRESENCE


def _presence_markdown(presence: dict) -> str:
    """The presence head's per-slice precision / recall of "object present" per volume and overall."""
    lines = [
        "Presence head on its own (object score > 0 on each axial slice, tracked from the prompt in both"
        " directions with nothing stopping):",
        "",
        "| volume | structures | mean precision | mean recall | pooled precision | pooled recall |",
        "|---|---|---|---|---|---|",
    ]
    rows = [*presence["by_volume"].items(), ("**all**", presence["all"])]
    for volume, p in rows:
        lines.append(
            f"| {volume} | {p['structures']} | {p['mean_precision']:.3f} | {p['mean_recall']:.3f} |"
            f" {p['pooled_precision']:.3f} | {p['pooled_recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    """The per-structure Dice / HD95 table, the means and timings, and the 2D one-prompt table."""
    short = [m.split(")")[0] + ")" for m in METHODS]
    lines = ["| volume | structure | " + " | ".join(short) + " |", "|---|---|" + "---|" * len(METHODS)]
    for volume, v in results["volumes"].items():
        for name, s in v["scores"].items():
            cells = [f"{s[m]['dice']:.3f} / {s[m]['hd95_mm']:.1f}" for m in METHODS]
            lines.append(f"| {volume} | {name} | " + " | ".join(cells) + " |")
    if "summary" in results:
        for volume, mean in results["summary"]["mean_dice_by_volume"].items():
            lines.append(f"| {volume} | mean Dice | " + " | ".join(f"{mean[m]:.3f}" for m in METHODS) + " |")
        mean = results["summary"]["mean_dice"]
        lines.append("| **mean Dice** | | " + " | ".join(f"**{mean[m]:.3f}**" for m in METHODS) + " |")
    parts = list(METHODS) + (
        [PRESENCE] if any(PRESENCE in v["seconds"] for v in results["volumes"].values()) else []
    )
    lines += ["", "Seconds per volume (all its structures together):", ""]
    lines += ["| volume | " + " | ".join(short + parts[len(METHODS) :]) + " |", "|---|" + "---|" * len(parts)]
    for volume, v in results["volumes"].items():
        cells = [f"{v['seconds'][m]:.0f}" if m in v["seconds"] else "" for m in parts]
        lines.append(f"| {volume} | " + " | ".join(cells) + " |")
    if "presence" in results.get("summary", {}):
        lines += ["", _presence_markdown(results["summary"]["presence"]).rstrip("\n")]
    if results.get("corrections"):
        lines += ["", corrections_markdown(results["corrections"]).rstrip("\n")]
    if results.get("one_prompt_2d"):
        lines += ["", "| structure | image from | one-prompt Dice (memory) | template box, no memory |"]
        lines.append("|---|---|---|---|")
        for name, rows in results["one_prompt_2d"].items():
            for source in ("CT", "MR"):
                mine = [r for r in rows if r["source"] == source]
                if mine:
                    a = np.mean([r["one_prompt_dice"] for r in mine])
                    b = np.mean([r["template_box_dice"] for r in mine])
                    lines.append(f"| {name} | {source} ({len(mine)} slices) | {a:.3f} | {b:.3f} |")
    return "\n".join(lines) + "\n"
