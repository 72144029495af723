"""A tiny random-weight Qwen2-Audio with a working processor, built locally (no downloads).

Tests, the README and the benchmark load it through the same `--alm-model PATH` users take: the
real `generate` path runs end to end, only the weights are random (the answers are noise).
"""
from __future__ import annotations

from pathlib import Path

# The special tokens Qwen2-Audio's tokenizer and chat template use.
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS]
# Qwen2-Audio-7B-Instruct's chat template (its processor's default): a system turn, each audio as
# "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>", then the text.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Text the byte-level BPE learns its merges from: enough English that answers decode to words.
_CORPUS = (
    "a dog barks in the distance while birds sing. a man speaks calmly in english. music plays with "
    "guitar and drums. rain falls on a roof, wind blows through trees, a car engine hums on the street. "
    "there is no speech in this audio. there is no music in this audio. describe the sounds you hear. "
    "the acoustic scene is a quiet room, a busy city, a forest, an office, a kitchen. water flows. "
)


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=END_OF_TEXT,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.padding_side = "left"
    return fast


def make_tiny_alm(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2-Audio (2 text layers, width 32) and its processor to `folder`."""
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, \
        WhisperFeatureExtractor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(folder)
    # Qwen2-Audio's front end: 128 mel bins at 16 kHz, 30 s windows (Whisper's).
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30, hop_length=160,
                                       n_fft=400, padding_value=0.0, return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = Qwen2AudioConfig(
        audio_config={"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                      "num_mel_bins": 128, "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 4096, "tie_word_embeddings": True},
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids(IM_END), ids(END_OF_TEXT)]
    model.generation_config.pad_token_id = ids(END_OF_TEXT)
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


__all__ = ["CHAT_TEMPLATE", "make_tiny_alm"]
