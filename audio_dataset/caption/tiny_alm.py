"""A tiny random-weight Qwen2-Audio with a working processor, built locally (no downloads).

Tests, the README and the benchmark load it through the same `--alm-model PATH` users take: the
real `generate` path runs end to end, only the weights are random (the answers are noise).
"""
from __future__ import annotations

from pathlib import Path

from audio_dataset.caption.tiny_llm import ENDOFTEXT, IM_END, build_tokenizer, tiny_qwen2_config, word_token_ids

# The audio tokens Qwen2-Audio's tokenizer adds to Qwen2's ChatML ones.
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
# Qwen2-Audio-7B-Instruct's chat template (its processor's default): a system turn, each audio as
# "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>", then the text.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
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


def make_tiny_alm(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2-Audio (1 audio layer, 2 text layers, width 32) and its processor to `folder`.
    The same seed gives the same weights."""
    import torch
    from transformers import GenerationConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, \
        Qwen2AudioProcessor, WhisperFeatureExtractor

    folder = Path(folder)
    # cap-write's tokenizer (caption words are single tokens), with the audio tokens and template.
    tokenizer = build_tokenizer((AUDIO, AUDIO_BOS, AUDIO_EOS), CHAT_TEMPLATE)
    # Qwen2-Audio's front end: 128 mel bins at 16 kHz, 30 s windows (Whisper's).
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30, hop_length=160,
                                       n_fft=400, padding_value=0.0, return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = Qwen2AudioConfig(
        audio_config={"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                      "num_mel_bins": 128, "max_source_positions": 1500},
        text_config=tiny_qwen2_config(len(tokenizer), eos, pad).to_dict(),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2AudioForConditionalGeneration(config).eval()
        with torch.no_grad():
            # Unit-gain weights (the default init's 0.02 makes every answer the same): what the model
            # says then depends on the audio and the question, so a batching bug shows.
            for module in model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                    fan_in = module.weight[0].numel()
                    module.weight.normal_(0.0, fan_in ** -0.5)
            model.get_input_embeddings().weight.normal_(0.0, 1.0)
    with torch.no_grad():  # as make_tiny_llm: answers made of words, not stray bytes
        embeddings = model.get_input_embeddings().weight
        keep = torch.zeros(len(embeddings), dtype=torch.bool)
        keep[word_token_ids(tokenizer)] = True
        embeddings[~keep] *= 0.01
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


__all__ = ["CHAT_TEMPLATE", "make_tiny_alm"]
