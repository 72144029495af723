"""Sonniss Game Audio GDC bundles: the free yearly archives of commercial sound libraries.

Verified: Sonniss gives away a "GDC Game Audio Bundle" every year (sonniss.com/gameaudiogdc), a set
of archives, one per contributing library, each a folder of WAV files named by their content;
LAION mirrored the 2015-2020 bundles (folders "Sonniss.com - GDC 20xx - Game Audio Bundle") and
captioned each WAV by its file name (download_and_preprocess_sonniss_game_effects.sh ->
preprocess_filename_dataset.py). The download pages change every year and sit behind a form, so
there is no stable listing to scrape: pass the bundle archives or folders you downloaded, a URL
list, or an HTTP directory listing (see `pipelines._packs`). Captions come from file and folder
names; the library (archive) and category folders are the tags.
"""
from __future__ import annotations

from pipelines._packs import PackSource


class Sonniss(PackSource):
    name = "sonniss"
    title = "Sonniss GDC Game Audio Bundle"
    license = "Sonniss GDC bundle licence: royalty-free, commercial use, no redistribution of the files"


SOURCE = Sonniss
