"""A tiny random-weight chat LLM saved to a folder, loaded the way a user's model folder is.

The real writers (Mistral, Qwen2.5-7B-Instruct...) cannot be downloaded in tests or in the README
walk-through, so `make_tiny_llm` builds one from a config: a Qwen2 causal LM of a few thousand
weights and a byte-level BPE tokenizer trained locally with `tokenizers` (no download), with a ChatML chat
template (`<|im_start|>role ... <|im_end|>`, Qwen's). `AutoTokenizer.from_pretrained(folder)` and
`AutoModelForCausalLM.from_pretrained(folder)` load it exactly as they load `--llm PATH`.

Every everyday English word of its small list is one token, and the other tokens' embeddings are
damped, so the random weights write strings of English words: the cleaning, the language check and the rest of the stage see text shaped like a caption.
`build_tokenizer` is shared with the tiny audio-language model (extra special tokens, same words).
"""
from __future__ import annotations

from pathlib import Path

# Qwen2's (ChatML) template, without its default system turn: the writer always sends one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer rebuilds it from this regex on load).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Words a sound caption is made of, plus the prompt's own words; anything else is <unk>.
_WORDS = """
a an the of in on at with and or but while then as by from to into over under near far behind
is are was were be being been it its this that these those there here some many few several one two
three four five six seven eight nine ten first second last loud quiet soft faint distant close
sound sounds noise noises heard hear hearing audio clip recording background foreground scene
dog dogs barks barking bark cat cats meows meowing bird birds chirp chirps chirping sing sings singing
song songs music musical melody rhythm beat beats drum drums drumming guitar piano violin bass
voice voices speech speaks speaking talk talks talking man men woman women child children people
crowd cheers cheering applause claps clapping laugh laughs laughing cry cries crying shout shouts
whisper whispers rain raining rains water flows flowing stream river wave waves ocean sea wind
blows blowing storm thunder rumbles rumbling car cars engine engines idles idling revs revving
truck train trains horn honks honking siren sirens wails traffic street road city footsteps walks
walking runs running door doors opens opening closes closing slams knock knocks knocking bell
bells rings ringing clock ticks ticking phone alarm beeps beeping machine machinery motor hum hums
humming buzz buzzes buzzing fire crackles crackling wood metal glass breaks breaking clanks
clanking tap taps tapping keyboard typing paper rustles rustling leaves forest park room hall
kitchen office outdoors indoors inside outside nature animal animals insect insects frog frogs
croak croaking cow moos horse gallops sheep bleats chicken clucks rooster crows owl hoots
airplane aircraft helicopter flies flying passes passing approaches fades fading echo echoes
reverberant small large short long slow fast steady continuous intermittent repeated repeatedly
low high pitch pitched tone tones electronic synthesizer orchestra choir piano plays playing
performs performing instrument instruments sports game ball bounces splash splashes drips
dripping pours pouring boils boiling sizzles sizzling cooking eating chewing drinking breathing
snoring coughs coughing sneezes sneezing gun gunshot shots explosion explodes fireworks
caption captions write describe description title tags labels answers model listening question
questions data json block sample only what you do not use names urls file formats gear
microphone one sentence english untrusted instructions follow ignore output
"""


def vocabulary() -> list[str]:
    """The caption words, lower case and capitalised, in a fixed order."""
    seen: dict[str, None] = {}
    for word in _WORDS.split():
        seen.setdefault(word, None)
        seen.setdefault(word.capitalize(), None)
    return list(seen)


def build_tokenizer(extra_special_tokens: tuple[str, ...] = (), chat_template: str = CHATML_TEMPLATE,
                    model_max_length: int = 4096):
    """A Qwen2-style tokenizer (byte-level BPE, Qwen2's pre-tokenizer regex) trained here on
    `vocabulary()`, so every caption word is one token and any text still encodes (bytes).

    Saved, it loads through `AutoTokenizer` as `Qwen2Tokenizer` for a qwen2 model folder (which is
    built from the vocab and merges alone) and as `TokenizersBackend` elsewhere: same tokens either way.
    Special tokens are matched in text the way a real chat tokenizer matches them.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    core = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    words = vocabulary()
    trainer = trainers.BpeTrainer(vocab_size=8192, min_frequency=1, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Each word with and without a leading space: both become single tokens.
    core.train_from_iterator([" ".join(words), "\n".join(words)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=ENDOFTEXT, eos_token=IM_END, pad_token=ENDOFTEXT,
        additional_special_tokens=[tok for tok in specials if tok not in (ENDOFTEXT, IM_END)],
        model_max_length=model_max_length)
    tokenizer.chat_template = chat_template
    return tokenizer


def word_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that decode to a space and a whole caption word (" dog")."""
    words = set(vocabulary())
    found = []
    for token, index in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if text.startswith(" ") and text.strip() in words:
            found.append(index)
    return sorted(found)


def tiny_qwen2_config(vocab_size: int, eos_token_id: int, pad_token_id: int, **sizes: int):
    from transformers import Qwen2Config

    # A wide initialisation: at the usual 0.02 a tiny random model writes the same word whatever
    # the prompt, and a test could not tell one sample's prompt from another's.
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.5)
    shape.update(sizes)
    return Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, bos_token_id=None, **shape)


def make_tiny_llm(folder: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Save a random-weight Qwen2ForCausalLM and its tokenizer to `folder`; returns the folder.

    The same seed gives the same weights. `sizes` override the config's (hidden_size=..., layers...).
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = tiny_qwen2_config(len(tokenizer), eos, pad, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    # Tied embeddings: damping every row but the caption words' makes greedy decoding pick words
    # (random weights would otherwise write stray bytes that no language check could judge).
    with torch.no_grad():
        keep = torch.zeros(len(tokenizer), dtype=torch.bool)
        keep[word_token_ids(tokenizer)] = True
        model.get_input_embeddings().weight[~keep] *= 0.01
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python -m audio_dataset.caption.tiny_llm FOLDER
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m audio_dataset.caption.tiny_llm FOLDER")
    print(make_tiny_llm(sys.argv[1]))
