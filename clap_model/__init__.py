"""CLAP (contrastive language-audio pretraining) on audiodata shards, laid out like open_clip.

- `config`: presets (`tiny` for CPUs; LAION-CLAP's `htsat-tiny-roberta`, `-fusion`, `pann14-roberta`, ...)
- `features`, `htsat`, `pann`, `fusion`, `text`, `clap`: the model, with LAION-CLAP's parameter names
- `data`: the webdataset loader; `loss`: the gathered symmetric contrastive loss
- `inputs`: the shard lists and checkpoints a command line names, checked before torch loads
- `train`, `main` (`clap-train`), `evaluate` (`clap-eval`), `metrics`, `checkpoint`, `distributed`
- `pickle_guard`: what a checkpoint file from a stranger may hold (container, pickle, memory) before torch loads it
- `msclap_format`: Microsoft CLAP's weight files (`msclap-2022`, `msclap-2023` presets) in and out
- `inference`: `CLAPInference` — embed audio and text, similarity, zero-shot classification
"""
