"""`audiodata search`: the top-k samples for a text (or an audio file), from the faiss index per split
that `audiodata embed` wrote, with the query embedded by the same model."""
from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from upath import UPath

from audio_dataset.curate.common import OK, file_digest, read_columns
from audio_dataset.curate.embed import ROW_COLUMNS, embedding_model, split_files
from audio_dataset.curate.index import full_vectors, load_index
from audio_dataset.source import UserError
from audio_dataset.storage import location


@dataclass(frozen=True)
class Hit:
    key: str
    caption: str | None
    score: float
    split: str
    shard: str  # the dataset's shard that holds the audio
    member: str  # the audio's member name in that tar
    source: str | None


@dataclass(frozen=True)
class SearchOptions:
    k: int = 10
    splits: tuple[str, ...] = ()  # default every split embed indexed
    # The model to embed the query with: the user names it (a dataset's run.json is data, never
    # loaded from), and its sha256 must be the one embed recorded.
    checkpoint: Path | None = None
    max_checkpoint_bytes: int | None = None  # what loading the checkpoint may allocate (default: by its size)
    text_model: str | None = None  # the user's text model for a checkpoint whose own is no preset's


class Searcher:
    """Loads each split's index and rows once; `text` and `audio` queries then cost one embedding."""

    def __init__(self, dataset: UPath, embed_dir: UPath, options: SearchOptions) -> None:
        self.dataset, self.embed_dir, self.options = location(dataset), location(embed_dir), options
        if options.k < 1:
            raise UserError("-k must be at least 1")
        self.model = embedding_model(embed_dir)
        self.splits = self._splits()
        self.clap = self._model()
        self.rows = {split: read_columns(split_files(embed_dir, split)["rows"], ROW_COLUMNS) for split in self.splits}
        self.usable = {split: pc.equal(rows.column("status"), OK).to_numpy(zero_copy_only=False)
                       for split, rows in self.rows.items()}
        # The index is data: it must hold one vector of the model's dimension per row, no more.
        dim = self.clap.model.cfg.joint_dim
        self.indexes = {split: self._index(split, dim) for split in self.splits}

    def _index(self, split: str, dim: int):
        files, count = split_files(self.embed_dir, split), self.rows[split].num_rows
        return load_index(files["index"], count, dim, full_vectors(files["audio"], count, dim))

    def _splits(self) -> list[str]:
        found = sorted(p.name[: -len(".audio.faiss")] for p in self.embed_dir.glob("*.audio.faiss"))
        if not found:
            raise UserError(f"{self.embed_dir}: no faiss index (rerun `audiodata embed` without --index none)")
        missing = [split for split in self.options.splits if split not in found]
        if missing:
            raise UserError(f"--split {', '.join(missing)}: not indexed (indexed: {', '.join(found)})")
        return list(self.options.splits) or found

    def _model(self):
        from clap_model.inference import CLAPInference

        checkpoint = self.options.checkpoint
        if checkpoint is None:
            # run.json is the dataset's, not the user's: its checkpoint is named, never loaded.
            raise UserError(f"search needs --checkpoint (the model embed used; {self.embed_dir} records "
                            f"{self.model.get('checkpoint')!r}, {self.model.get('digest')!r})")
        if not checkpoint.exists():
            raise UserError(f"--checkpoint {checkpoint}: not found")
        if file_digest(checkpoint) != self.model["digest"]:
            raise UserError(f"--checkpoint {checkpoint} is not the model the embeddings were made with")
        return CLAPInference.from_checkpoint(checkpoint, model=self.model.get("preset"),
                                             text_model=self.options.text_model,
                                             max_checkpoint_bytes=self.options.max_checkpoint_bytes)

    def text(self, query: str) -> list[Hit]:
        return self.vector(self.clap.embed_text([query]).numpy()[0])

    def audio(self, path: Path) -> list[Hit]:
        if not path.is_file():
            raise UserError(f"--audio {path}: no such file")
        try:
            vector = self.clap.embed_audio([path]).numpy()[0]
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"--audio {path}: unreadable audio ({str(exc)[:120]})") from None
        return self.vector(vector)

    def vector(self, vector: np.ndarray) -> list[Hit]:
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        found: list[Hit] = []
        for split in self.splits:
            usable = self.usable[split]
            # Samples without audio or text hold zero vectors: ask for enough to skip them.
            wanted = min(len(usable), self.options.k + int((~usable).sum()))
            scores, ids = self.indexes[split].search(query, wanted)
            found += [self._hit(split, int(i), float(s)) for s, i in zip(scores[0], ids[0]) if 0 <= i < len(usable) and usable[i]]
        return heapq.nlargest(self.options.k, found, key=lambda hit: hit.score)

    def _hit(self, split: str, row: int, score: float) -> Hit:
        values = {name: self.rows[split].column(name)[row].as_py() for name in ("key", "caption", "shard", "member",
                                                                                  "source")}
        return Hit(values["key"], values["caption"], score, split, str(self.dataset / split / values["shard"]),
                   values["member"], values["source"])


def hits_json(hits: list[Hit]) -> list[dict[str, Any]]:
    return [asdict(hit) for hit in hits]


__all__ = ["Hit", "SearchOptions", "Searcher", "hits_json"]
