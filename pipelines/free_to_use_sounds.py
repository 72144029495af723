"""Free To Use Sounds: field-recording and foley libraries sold by freetousesounds.com.

Verified: LAION bought the "All-In-One Sound Library Bundle" (laion-audio-630k README links
freetousesounds.com/product/all-in-one-sound-library-bundle/ as "need purchasing"), mirrored the
purchased packs and captioned each WAV by its file name
(download_and_preprocess_free_to_use_sound.sh -> preprocess_filename_dataset.py). The shop has no
public listing of the audio itself: pass the downloaded pack archives or folders, a URL list, or an
HTTP directory listing (see `pipelines._packs`).
"""
from __future__ import annotations

from pipelines._packs import PackSource


class FreeToUseSounds(PackSource):
    name = "free_to_use_sounds"
    title = "Free To Use Sounds library"
    license = "Free To Use Sounds licence (purchased): royalty-free use, no redistribution of the files"


SOURCE = FreeToUseSounds
