"""audiodata: build LAION-Audio-630K-style audio-text datasets as webdataset shards."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("audiodata")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"
