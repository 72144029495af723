"""`audiodata sources`: every source with its licence, the paper's counts and what was built."""
from __future__ import annotations

from collections import defaultdict

from audio_dataset import manifest
from audio_dataset.source import available_sources, read_definition
from audio_dataset.storage import Location, location


def built_counts(outputs: list[Location]) -> dict[str, tuple[int, float]]:
    """ok items and output hours per source, summed over build outputs."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for out in outputs:
        path = location(out) / manifest.MANIFEST_FILE
        if not path.exists():
            continue
        for row in manifest.read_table(path).select(["source", "status", "output_duration"]).to_pylist():
            if row["status"] == manifest.STATUS_OK:
                totals[row["source"]][0] += 1
                totals[row["source"]][1] += row["output_duration"] / 3600
    return {name: (int(v[0]), v[1]) for name, v in totals.items()}


def sources_table(outputs: list[Location]) -> str:
    """One line per source; the licence comes last and whole (a cut licence misleads)."""
    built = built_counts(outputs)
    header = f"{'source':<20}{'paper clips':>12}{'paper h':>10}{'built':>8}{'built h':>9}  {'status':<14}licence"
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
            f"{spec.get('license', '-')}"
        )
    return "\n".join(lines)
