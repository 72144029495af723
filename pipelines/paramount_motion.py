"""Paramount Motion's "Odeon Cinematic Sound Effects Pack".

Verified: LAION bought the pack (laion-audio-630k README links
paramountmotion.com/odeon-sound-effects as "need purchasing"), mirrored it (folder
"Paramount Motion - Odeon Cinematic Sound Effects Pack") and captioned each WAV by its file name
(download_and_preprocess_paramount_motion.sh -> preprocess_filename_dataset.py). There is no public
listing of the audio: pass the downloaded archive or folder, a URL list, or an HTTP directory
listing (see `pipelines._packs`).
"""
from __future__ import annotations

from pipelines._packs import PackSource


class ParamountMotion(PackSource):
    name = "paramount_motion"
    title = "Paramount Motion Odeon Cinematic Sound Effects Pack"
    license = "Paramount Motion licence (purchased): royalty-free use, no redistribution of the files"


SOURCE = ParamountMotion
