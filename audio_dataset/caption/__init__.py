"""`audiodata caption`: recaption a corpus the way WavCaps and AudioSetCaps did.

Three steps, each usable alone and recorded: an audio-language model *listens* (answers questions
about each clip, per window), an LLM *writes* captions from the answers and the sample's own
metadata, and a CLAP model *checks* each candidate against the audio. `types.py` is the contract
between the steps and the stage that runs them.
"""
