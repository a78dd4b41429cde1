"""Generated text and tiny random-weight models built from it, for the tests and the benchmark.

Nothing here is downloaded: the text is generated from a seeded syllable grammar, tokenizers
are trained on that text, and models get random weights from a config.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "kr", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "s", "r", "l", "k", "m"]


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.choice([1, 1, 2, 2, 3])
        words.add(
            "".join(
                rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                for _ in range(syllables)
            )
        )
    return sorted(words)


def generate_texts(
    rows: int, seed: int = 0, mean_words: float = 24.0, sigma: float = 0.9
) -> list[str]:
    """Return `rows` pseudo-sentences with log-normal word counts (a skewed, real-looking mix)."""
    rng = random.Random(seed)
    lengths = np.random.default_rng(seed).lognormal(np.log(mean_words), sigma, size=rows)
    words = _vocabulary(rng, 2000)
    # Zipf-like word frequencies, as in natural text.
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    texts = []
    for n in lengths:
        count = max(1, int(n))
        sentence = rng.choices(words, weights=weights, k=count)
        sentence[0] = sentence[0].capitalize()
        texts.append(" ".join(sentence) + rng.choice([".", ".", "!", "?"]))
    return texts


def write_corpus(
    path: str | Path,
    rows: int,
    seed: int = 0,
    mean_words: float = 24.0,
    with_targets: bool = True,
    row_group_size: int = 1000,
) -> Path:
    """Write a Parquet corpus with columns `doc_id`, `text` and optionally `target`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {
        "doc_id": [f"doc-{seed}-{i:06d}" for i in range(rows)],
        "text": generate_texts(rows, seed, mean_words),
    }
    if with_targets:
        columns["target"] = generate_texts(rows, seed + 1000, mean_words=mean_words / 2)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def train_sentencepiece(
    texts: list[str], model_prefix: Path, vocab_size: int, normalization: str = "nmt_nfkc"
) -> Path:
    """A unigram SentencePiece model trained on `texts` (T5's ids: pad 0, EOS 1, unk 2);
    `normalization="identity"` leaves out NFKC's 240 KB table."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
        normalization_rule_name=normalization,
    )
    return model_prefix.with_suffix(".model")


def build_t5(
    out_dir: str | Path,
    texts: list[str],
    d_model: int = 64,
    num_layers: int = 2,
    vocab_size: int = 1000,
    seed: int = 0,
    model_vocab_size: int | None = None,
) -> Path:
    """Train a SentencePiece tokenizer on `texts` and save a random-weight T5 with it.

    `model_vocab_size` sets the output vocabulary (default: the tokenizer's size + 28, as in t5);
    a generated corpus cannot train a 32k tokenizer, but a benchmark needs a 32k LM head.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(texts, out_dir / "spiece", vocab_size)
    # from_pretrained converts spiece.model into a fast tokenizer; the bare constructor does not.
    tokenizer = T5Tokenizer.from_pretrained(str(out_dir), extra_ids=0, legacy=False)
    config = T5Config(
        vocab_size=model_vocab_size or len(tokenizer) + 28,
        d_model=d_model,
        d_kv=max(8, d_model // 4),
        d_ff=d_model * 4,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _train_bpe(texts: list[str], vocab_size: int, specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def gpt2_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts`, as a GPT-2 tokenizer (`<|endoftext|>` both ends)."""
    from transformers import PreTrainedTokenizerFast

    raw = _train_bpe(texts, vocab_size, ("<|endoftext|>", "<|endoftext|>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        model_max_length=1024,
    )


def _gpt2(
    texts: list[str], vocab_size: int, d_model: int, num_layers: int, model_vocab: int | None
):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer(texts, vocab_size)
    config = GPT2Config(
        vocab_size=model_vocab or len(tokenizer),
        n_embd=d_model,
        n_layer=num_layers,
        n_head=4,
        n_positions=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, GPT2LMHeadModel(config)


def _llama(
    texts: list[str],
    vocab_size: int,
    d_model: int,
    num_layers: int,
    model_vocab: int | None,
    chat_tokens: tuple[str, ...] = (),
):
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = _train_bpe(texts, vocab_size, ("<s>", "</s>", *chat_tokens))
    bos = raw.token_to_id("<s>")
    # Llama tokenizers prepend BOS, so truncation has a special token to keep.
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=2048,
        extra_special_tokens=list(chat_tokens),
    )
    config = LlamaConfig(
        vocab_size=model_vocab or len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_model * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=raw.token_to_id("</s>"),
        tie_word_embeddings=False,
    )
    return tokenizer, LlamaForCausalLM(config)


def build_causal(
    out_dir: str | Path,
    texts: list[str],
    family: str = "gpt2",
    d_model: int = 64,
    num_layers: int = 2,
    vocab_size: int = 1000,
    seed: int = 0,
    model_vocab_size: int | None = None,
) -> Path:
    """Train a byte-level BPE on `texts` and save a random-weight GPT-2 or Llama with it.

    `model_vocab_size` sets the output vocabulary (default: the tokenizer's size).
    """
    import torch

    builders = {"gpt2": _gpt2, "llama": _llama}
    if family not in builders:
        raise ValueError(f"unknown causal family {family!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer, model = builders[family](texts, vocab_size, d_model, num_layers, model_vocab_size)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ChatML, as Qwen and many fine-tunes use it, after a BOS token as Llama's templates put one.
CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_causal(
    out_dir: str | Path,
    texts: list[str],
    d_model: int = 32,
    num_layers: int = 2,
    vocab_size: int = 300,
    seed: int = 0,
) -> Path:
    """A random-weight Llama whose tokenizer has ChatML's special tokens and template."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer, model = _llama(
        texts, vocab_size, d_model, num_layers, None, ("<|im_start|>", "<|im_end|>")
    )
    tokenizer.chat_template = CHATML
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_peaked_causal(
    out_dir: str | Path,
    texts: list[str],
    *,
    d_model: int = 64,
    num_layers: int = 2,
    vocab_size: int = 2000,
    model_vocab_size: int = 32000,
    spread: float = 8.0,
    zipf: float = 1.5,
    seed: int = 0,
) -> Path:
    """A random-weight GPT-2 whose next-token distributions are peaked like a trained model's.

    Its own LM head (not tied to the embeddings) gives logits of standard deviation `spread`,
    plus a frequency skew: one hidden unit is held at 1 by the final layer norm, and its head
    weights add `-zipf * log(1 + id)`, so low ids (a BPE vocabulary's early, frequent merges)
    are likelier everywhere. The defaults put the mean entropy near 1.2 nats, the top-1
    probability near 0.64, and a plain float16 k=64 output near the 254.5 bytes a position
    (149 of ids, 94 of logits) measured on a trained model's output.
    """
    import torch

    out_dir = Path(
        build_causal(
            out_dir, texts, "gpt2", d_model, num_layers, vocab_size, seed, model_vocab_size
        )
    )
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out_dir)
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(model_vocab_size, d_model, generator=generator) * spread / d_model**0.5
    head[:, 0] = -zipf * torch.log1p(torch.arange(model_vocab_size, dtype=torch.float32))
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 1.0
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
