"""Curation with a CLAP model, as shard-to-table or shard-to-shard stages over a build output:

    audiodata embed OUT --checkpoint CKPT          # OUT/embed: audio + text embeddings, a faiss index
    audiodata dedup OUT --against EVAL_OUT         # OUT/dedup/clusters.parquet (exact, fingerprint, embedding)
    audiodata filter OUT --out NEW --min-similarity 0.2 --dedup
    audiodata search OUT "a dog barks in the rain"

Every stage runs on `audio_dataset.stage_runner`: resumable per shard, one Ray actor per worker.
"""
