"""The Markdown tables of ``medsam2 train evaluate`` (:mod:`.evaluate`) from its JSON results."""

from __future__ import annotations

import numpy as np

from .corrections import corrections_markdown
from .evaluate import LESIONS_KEY, METHODS, PRESENCE
from .extent import ENDS_WITHIN_SLICES
from .orientations import extra_axes_markdown

SHORT = [m.split(")")[0] + ")" for m in METHODS]


def markdown(results: dict) -> str:
    """The per-structure Dice / HD95 table with its means, the small structures' table, the axial extents,
    what six orientations changed against two, the timings, the presence head's figures, the corrections, the
    synthetic lesions' table and the 2D one-prompt table (those there are)."""
    summary = results.get("summary", {})
    tables = []
    if results["volumes"]:
        tables.append(_dice_table(results, "scores", summary))
        if "small" in summary:
            tables.append(_dice_table(results, "small_scores", summary["small"]))
        tables += [_extent_table(results), extra_axes_markdown(results), _seconds_table(results)]
    if "presence" in summary:
        tables.append(_presence_table(summary["presence"]))
    if results.get("corrections"):
        tables.append(corrections_markdown(results["corrections"]))
    if results.get("small_corrections"):
        tables.append(corrections_markdown(results["small_corrections"], "small structures"))
    if results.get(LESIONS_KEY):
        tables.append(_lesions_table(results[LESIONS_KEY]))
    if results.get("one_prompt_2d"):
        tables.append(_one_prompt_table(results["one_prompt_2d"]))
    return "\n".join(t.rstrip("\n") + "\n" for t in tables if t)


def _dice_table(results: dict, key: str, summary: dict) -> str:
    """3D Dice / HD95 per structure of ``key`` (``scores`` or ``small_scores``) and method, with the means."""
    small = key == "small_scores"
    extra = ["ml", "slices"] if small else []
    lines = [
        *(["Small structures (under 10 ml; segmented apart from the others):", ""] if small else []),
        "| volume | structure | " + " | ".join(extra + SHORT) + " |",
        "|---|---|" + "---|" * (len(extra) + len(METHODS)),
    ]
    for volume, v in results["volumes"].items():
        for name, s in v.get(key, {}).items():
            reference = v["references"][name]
            cells = [f"{reference['ml']:.2f}", f"{reference['first']}-{reference['last']}"] if small else []
            cells += [f"{s[m]['dice']:.3f} / {s[m]['hd95_mm']:.1f}" for m in METHODS]
            lines.append(f"| {volume} | {name} | " + " | ".join(cells) + " |")
    if summary:
        blank = " |" * len(extra)
        for volume, mean in summary["mean_dice_by_volume"].items():
            cells = " | ".join(f"{mean[m]:.3f}" for m in METHODS)
            lines.append(f"| {volume} | mean Dice |{blank} {cells} |")
        mean = summary["mean_dice"]
        label = f"**mean Dice, {summary['structures']} small structures**" if small else "**mean Dice**"
        lines.append(f"| {label} | |{blank} " + " | ".join(f"**{mean[m]:.3f}**" for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


def _extent_table(results: dict) -> str:
    """First-last axial slice of each structure's reference and of each method's result, with the errors in
    slices at each end (first, last; negative: before the reference's end), and the share ending within
    :data:`.extent.ENDS_WITHIN_SLICES` slices at both ends."""
    lines = _table_head(
        "Axial extent (first-last slice; in brackets the error in slices at the first / last end):",
        ["volume", "structure", "reference"],
    )
    summary = results.get("summary", {})
    for key, label, shares in (
        ("scores", "structures", summary.get("ends_within")),
        ("small_scores", "small structures", summary.get("small", {}).get("ends_within")),
    ):
        for volume, v in results["volumes"].items():
            for name, s in v.get(key, {}).items():
                reference = v["references"][name]
                cells = [f"{reference['first']}-{reference['last']}"] + [
                    _extent(s[m]["extent"]) for m in METHODS
                ]
                lines.append(f"| {volume} | {name} | " + " | ".join(cells) + " |")
        if shares:
            cells = " | ".join(f"{shares[m]:.0%}" for m in METHODS)
            lines.append(
                f"| **{label}: ends within {ENDS_WITHIN_SLICES} slices at both ends** | | | {cells} |"
            )
    return "\n".join(lines) + "\n"


def _table_head(title: str, columns: list[str]) -> list[str]:
    """A table's title line, a blank line, and its header: ``columns`` then one column per method."""
    names = columns + SHORT
    return [title, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def _extent(e: dict) -> str:
    if e["first"] is None:
        return "empty"
    return f"{e['first']}-{e['last']} ({e['first_error']:+d} / {e['last_error']:+d})"


def _lesions_table(lesions: dict) -> str:
    """Dice and axial extent of each synthetic lesion per method, with the means and the share ending within
    :data:`.extent.ENDS_WITHIN_SLICES` slices at both ends."""
    lines = _table_head(
        "Synthetic lesions in the chest CT (Dice, axial extent with its errors at the first / last end):",
        ["lesion", "ml", "reference"],
    )
    for name, s in lesions["scores"].items():
        reference = lesions["references"][name]
        cells = [f"{reference['ml']:.2f}", f"{reference['first']}-{reference['last']}"]
        cells += [f"{s[m]['dice']:.3f}, {_extent(s[m]['extent'])}" for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    summary = lesions.get("summary")
    if summary:
        mean, shares = summary["mean_dice"], summary["ends_within"]
        lines.append("| **mean Dice** | | | " + " | ".join(f"**{mean[m]:.3f}**" for m in METHODS) + " |")
        lines.append(
            f"| **ends within {ENDS_WITHIN_SLICES} slices at both ends** | | | "
            + " | ".join(f"{shares[m]:.0%}" for m in METHODS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _seconds_table(results: dict) -> str:
    timed = any(PRESENCE in v["seconds"] for v in results["volumes"].values())
    parts = list(METHODS) + ([PRESENCE] if timed else [])
    lines = ["Seconds per volume (all its structures together):", ""]
    lines += ["| volume | " + " | ".join(SHORT + parts[len(METHODS) :]) + " |", "|---|" + "---|" * len(parts)]
    for volume, v in results["volumes"].items():
        cells = [f"{v['seconds'][m]:.0f}" if m in v["seconds"] else "" for m in parts]
        lines.append(f"| {volume} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _presence_table(presence: dict) -> str:
    """The presence head's per-slice precision / recall of "object present" per volume and overall."""
    lines = [
        "Presence head on its own (object score > 0 on each axial slice, tracked from the prompt in both"
        " directions with nothing stopping):",
        "",
        "| volume | structures | mean precision | mean recall | pooled precision | pooled recall |",
        "|---|---|---|---|---|---|",
    ]
    rows = [*presence["by_volume"].items(), ("**all**", presence["all"])]
    if "small" in presence:
        rows.append(("**small structures**", presence["small"]))
    for volume, p in rows:
        lines.append(
            f"| {volume} | {p['structures']} | {p['mean_precision']:.3f} | {p['mean_recall']:.3f} |"
            f" {p['pooled_precision']:.3f} | {p['pooled_recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _one_prompt_table(one_prompt: dict) -> str:
    lines = [
        "| structure | image from | one-prompt Dice (memory) | template box, no memory |",
        "|---|---|---|---|",
    ]
    for name, rows in one_prompt.items():
        for source in ("CT", "MR"):
            mine = [r for r in rows if r["source"] == source]
            if mine:
                a = np.mean([r["one_prompt_dice"] for r in mine])
                b = np.mean([r["template_box_dice"] for r in mine])
                lines.append(f"| {name} | {source} ({len(mine)} slices) | {a:.3f} | {b:.3f} |")
    return "\n".join(lines) + "\n"
