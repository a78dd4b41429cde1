"""Train the sample models once: `python -m lib.sample.train [DIR]` (default lib/sample/models).

A T5 (summarize a docstring into its summary line) and a GPT-2 (continue a docstring), both
tiny, with a 2,000-token tokenizer each, trained on the standard library docstrings of the
modules that `docstrings.held_out` does not hold out, seeded, on one CPU thread. Saved in
float16 (under 2 MB together) with their tokenizers; `make extract` copies them next to the
held-out corpus. It prints each model's top-1 accuracy and perplexity on the held-out rows.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch

from lib.sample import docstrings
from lib.sample.generated import gpt2_tokenizer, train_sentencepiece

VOCAB = 2000
SEED = 0
T5_SHAPE = {"d_model": 64, "d_ff": 256, "num_layers": 2, "num_heads": 4, "d_kv": 16}
T5_STEPS, T5_BATCH, T5_TEXT, T5_TARGET = 1500, 16, 128, 32
GPT2_SHAPE = {"n_embd": 96, "n_layer": 2, "n_head": 4}
GPT2_STEPS, GPT2_BATCH, GPT2_WINDOW = 1200, 16, 64
LEARNING_RATE, WARMUP = 3e-3, 50


def compact_json(path: Path) -> None:
    """Rewrite a JSON file without indentation (a fifth of a tokenizer.json's bytes)."""
    path.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":")))


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to a tenth."""

    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(model, batches, steps: int) -> None:
    """AdamW over `steps` batches (each a dict of model inputs with labels)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = _schedule(optimizer, steps)
    for step in range(steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def _score(model, batches: list[dict]) -> tuple[float, float]:
    """Top-1 accuracy and perplexity over the labelled positions of `batches`."""
    right = total = 0
    logprob = 0.0
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"]
        if "decoder_input_ids" not in batch:  # causal: position p predicts token p + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels >= 0
        logprobs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))[..., 0]
        logprob += float(logprobs[mask].sum())
        right += int((logits.argmax(-1) == labels)[mask].sum())
        total += int(mask.sum())
    return right / total, math.exp(-logprob / total)


def _t5_batches(tokenizer, docs: list[docstrings.Doc], rng: random.Random, shuffle: bool):
    """Padded (text, summary) batches, forever when shuffled, else once in order."""

    def batch(rows: list[docstrings.Doc]) -> dict:
        source = tokenizer(
            ["summarize: " + d.text for d in rows],
            max_length=T5_TEXT,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        target = tokenizer(
            text_target=[d.target for d in rows],
            max_length=T5_TARGET,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"]} | {
            "labels": labels
        }

    if not shuffle:
        return [batch(docs[i : i + T5_BATCH]) for i in range(0, len(docs), T5_BATCH)]

    def forever():
        while True:
            yield batch(rng.sample(docs, T5_BATCH))

    return forever()


def _with_decoder_inputs(model, batches: list[dict]) -> list[dict]:
    """Held-out batches with the teacher-forced decoder input the labels imply."""
    out = []
    for batch in batches:
        decoder = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        out.append(batch | {"decoder_input_ids": decoder})
    return out


def train_t5(train: list[docstrings.Doc], test: list[docstrings.Doc], out: Path) -> tuple:
    """The summarizing T5, saved to `out`; its held-out (top-1, perplexity)."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    texts = [d.text for d in train] + [d.target for d in train]
    train_sentencepiece(texts, out / "spiece", VOCAB, normalization="identity")
    tokenizer = T5Tokenizer.from_pretrained(str(out), extra_ids=0, legacy=False)
    config = T5Config(
        vocab_size=len(tokenizer),
        **T5_SHAPE,
        num_decoder_layers=T5_SHAPE["num_layers"],
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    model = T5ForConditionalGeneration(config)
    _fit(model, _t5_batches(tokenizer, train, random.Random(SEED), True), T5_STEPS)
    held = _with_decoder_inputs(model, _t5_batches(tokenizer, test, None, False))
    figures = _score(model, held)
    model.half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in ("spiece.model", "spiece.vocab"):  # tokenizer.json holds the same pieces
        (out / name).unlink(missing_ok=True)
    compact_json(out / "tokenizer.json")
    return figures


def _stream(tokenizer, docs: list[docstrings.Doc]) -> torch.Tensor:
    """Every row's text and summary as one token stream, rows separated by end-of-text."""
    ids = []
    for doc in docs:
        ids += tokenizer(f"{doc.target}\n{doc.text}")["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def _gpt2_batches(stream: torch.Tensor, rng: random.Random):
    """Random windows of the training stream, forever."""
    while True:
        starts = [rng.randrange(len(stream) - GPT2_WINDOW) for _ in range(GPT2_BATCH)]
        ids = torch.stack([stream[s : s + GPT2_WINDOW] for s in starts])
        yield {"input_ids": ids, "labels": ids}


def train_gpt2(train: list[docstrings.Doc], test: list[docstrings.Doc], out: Path) -> tuple:
    """The continuing GPT-2, saved to `out`; its held-out (top-1, perplexity)."""
    texts = [d.text for d in train] + [d.target for d in train]
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer(texts, VOCAB)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        **GPT2_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    _fit(model, _gpt2_batches(_stream(tokenizer, train), random.Random(SEED)), GPT2_STEPS)
    held = _stream(tokenizer, test)
    windows = [held[i : i + 256] for i in range(0, len(held) - 1, 256)]
    batches = [{"input_ids": w[None], "labels": w[None]} for w in windows if len(w) > 1]
    figures = _score(model, batches)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    compact_json(out / "tokenizer.json")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Train both models; print their held-out figures."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else Path(__file__).resolve().parent / "models")
    torch.set_num_threads(1)  # the same weights on every machine that runs this
    docs = docstrings.collect()
    train = [d for d in docs if not docstrings.held_out(d.module)]
    test = [d for d in docs if docstrings.held_out(d.module)]
    print(f"{len(train):,} training rows, {len(test):,} held out", flush=True)
    for name, trainer in (("gpt2", train_gpt2), ("t5", train_t5)):
        top1, perplexity = trainer(train, test, root / name)
        print(f"{name}: held-out top-1 {top1:.1%}, perplexity {perplexity:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
