"""`audiodata sources`: every source with its licence, the paper's counts and what was built."""
from __future__ import annotations

from collections import defaultdict

from audio_dataset import manifest
from audio_dataset.licenses import CLASSES, UNKNOWN, classify, is_known
from audio_dataset.source import available_sources, read_definition
from audio_dataset.storage import Location, location


def built_counts(outputs: list[Location]) -> dict[str, tuple[int, float]]:
    """ok items and output hours per source, summed over build outputs."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for (source, _), (items, hours) in built_by_class(outputs).items():
        totals[source][0] += items
        totals[source][1] += hours
    return {name: (int(v[0]), v[1]) for name, v in totals.items()}


def built_by_class(outputs: list[Location]) -> dict[tuple[str, str], tuple[int, float]]:
    """ok items and output hours per (source, licence class), summed over build outputs."""
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for out in outputs:
        path = location(out) / manifest.MANIFEST_FILE
        if not path.exists():
            continue
        columns = ["source", "status", "output_duration", "license_class"]
        for row in manifest.read_table(path).select(columns).to_pylist():
            if row["status"] == manifest.STATUS_OK:
                total = totals[(row["source"], row["license_class"] or UNKNOWN)]
                total[0] += 1
                total[1] += row["output_duration"] / 3600
    order = sorted(totals, key=lambda key: (key[0], CLASSES.index(key[1]) if key[1] in CLASSES else len(CLASSES)))
    return {key: (int(totals[key][0]), totals[key][1]) for key in order}


def definition_class(licence: str | None) -> str:
    """The class a definition's licence string names, or `per item` where each item records its own."""
    found_id, found = classify(licence)
    return "per item" if found_id is None and is_known(licence) else found


def sources_table(outputs: list[Location]) -> str:
    """One line per source; the licence comes last and whole (a cut licence misleads)."""
    built = built_counts(outputs)
    header = (f"{'source':<20}{'paper clips':>12}{'paper h':>10}{'built':>8}{'built h':>9}  {'status':<14}"
              f"{'class':<14}licence")
    lines = [header]
    for name in available_sources():
        spec = read_definition(name)
        clips, hours = built.get(name, (0, 0.0))
        paper_clips = spec.get("paper_clips")
        paper_hours = spec.get("paper_hours")
        status = "ready" if spec else "no definition"
        lines.append(
            f"{name:<20}"
            f"{paper_clips if paper_clips is not None else '-':>12}"
            f"{paper_hours if paper_hours is not None else '-':>10}"
            f"{clips if outputs else '-':>8}{(f'{hours:.2f}' if outputs else '-'):>9}  {status:<14}"
            f"{definition_class(spec.get('license')) if spec else '-':<14}{spec.get('license', '-')}"
        )
    by_class = built_by_class(outputs)
    if by_class:  # what was built, by the licence each item recorded
        lines.append("built by licence class:")
        for source in sorted({source for source, _ in by_class}):
            parts = [f"{cls} {items} ({hours:.2f} h)" for (name, cls), (items, hours) in by_class.items()
                     if name == source]
            lines.append(f"  {source}: {', '.join(parts)}")
    return "\n".join(lines)
