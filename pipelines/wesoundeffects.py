"""WeSoundEffects: sound-effect libraries sold by wesoundeffects.com.

Verified: LAION bought WeSoundEffects libraries (laion-audio-630k README: "website (need
purchasing)"), mirrored them (folder "WeSoundEffects") and captioned each WAV by its file name
(download_and_preprocess_wesoundeffects.sh -> preprocess_filename_dataset.py). There is no public
listing of the audio: pass the downloaded archives or folders, a URL list, or an HTTP directory
listing (see `pipelines._packs`).
"""
from __future__ import annotations

from pipelines._packs import PackSource


class WeSoundEffects(PackSource):
    name = "wesoundeffects"
    title = "WeSoundEffects library"
    license = "WeSoundEffects licence (purchased): royalty-free use, no redistribution of the files"


SOURCE = WeSoundEffects
