"""What the job is measured against: the naive loop a careful user writes, and the model's own
forward passes (dense batches, and exactly the job's batches)."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lib.bench.runs import child_seconds, job_config
from lib.extract import batching, models


def corpus_tokens(model: str, corpus: str, max_length: int) -> int:
    """Input tokens of a corpus, as the job counts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
    return sum(len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"])


def naive_batch_table(
    first_id: int, logits: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None, k: int
) -> pa.Table:
    """One batch's output rows, vectorized: a row per real position of (batch, length, vocab).

    `input_ids` (causal models) give each position's next token; None: no token (T5 start)."""
    lse = logits.logsumexp(-1)
    values, ids = logits.topk(k, -1)
    rows, positions = mask.nonzero(as_tuple=True)
    columns = {
        "id": (rows + first_id).cpu().numpy(),
        "position": positions.cpu().numpy(),
        "token_id": pa.nulls(len(rows), pa.int64()),
        "token_logprob": pa.nulls(len(rows), pa.float32()),
        "logsumexp": lse[mask].cpu().numpy(),
        "topk_ids": pa.FixedSizeListArray.from_arrays(ids[mask].cpu().numpy().ravel(), k),
        "topk_logits": pa.FixedSizeListArray.from_arrays(values[mask].cpu().numpy().ravel(), k),
    }
    if input_ids is not None:  # right padding: the last real position has no next token
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = mask[:, 1:]
        next_token = torch.zeros_like(input_ids, dtype=torch.long)
        next_token[:, :-1] = input_ids[:, 1:]
        logprob = logits.gather(-1, next_token.unsqueeze(-1)).squeeze(-1) - lse
        missing = ~has_next[mask].cpu().numpy()
        columns["token_id"] = pa.array(next_token[mask].cpu().numpy(), mask=missing)
        columns["token_logprob"] = pa.array(logprob[mask].cpu().numpy(), mask=missing)
    return pa.table(columns)


@torch.inference_mode()
def naive_loop(
    model_dir: str, corpus: str, out: str, k: int, max_length: int, device: str
) -> float:
    """The loop a careful user writes by hand; returns seconds including model loading."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    started = time.perf_counter()
    seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
    tables = []
    for first in range(0, len(texts), 32):
        enc = tok(
            texts[first : first + 32],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        if seq2seq:
            rows = enc.input_ids.shape[0]
            start = torch.full((rows, 1), model.config.decoder_start_token_id, device=device)
            logits = model(**enc, decoder_input_ids=start).logits.float()
            mask, input_ids = torch.ones((rows, 1), dtype=torch.bool, device=device), None
        else:
            logits = model(**enc).logits.float()
            mask, input_ids = enc.attention_mask.bool(), enc.input_ids
        tables.append(naive_batch_table(first, logits, mask, input_ids, k))
    pq.write_table(pa.concat_tables(tables), out)
    return time.perf_counter() - started


def _naive_settings(model: str, corpus: str, out: str, args) -> dict:
    """naive_loop's arguments, for this process or a child."""
    return {
        "model_dir": model,
        "corpus": corpus,
        "out": out,
        "k": args.k,
        "max_length": args.max_length,
        "device": args.device,
    }


def naive_seconds(model: str, corpus: str, out: str, args) -> float:
    """Seconds of the naive loop in this process, model loading included."""
    return naive_loop(**_naive_settings(model, corpus, out, args))


def naive_child(payload: str) -> None:
    """`--naive-child`: the naive loop alone in this process, for end-to-end timing."""
    naive_loop(**json.loads(payload))


def naive_process_seconds(model: str, corpus: str, out: str, args) -> float:
    """Wall seconds of the naive loop in a fresh process, imports and all."""
    payload = json.dumps(_naive_settings(model, corpus, out, args))
    return child_seconds(["-m", "jobs.bench", "--naive-child", payload], args)[0]


@torch.inference_mode()
def dense_rate(
    model_dir: str, mean_length: int, total_tokens: int, max_tokens: int, device: str, dtype: str
) -> float:
    """Tokens/s of plain forward passes on equal-length batches, no padding and no output."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from lib.extract.models import resolve_dtype

    seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = (
        cls.from_pretrained(
            model_dir, dtype=resolve_dtype(dtype, torch.device(device)), attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    rows = max(1, max_tokens // mean_length)
    ids = torch.randint(3, 1000, (rows, mean_length), device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if seq2seq:
        kwargs["decoder_input_ids"] = torch.zeros((rows, 1), dtype=torch.long, device=device)
    model(**kwargs)  # warm-up
    batches = max(3, total_tokens // (rows * mean_length))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(batches):
        model(**kwargs).logits.float()
    sync()
    return batches * rows * mean_length / (time.perf_counter() - started)


@torch.inference_mode()
def model_only_seconds(lm: models.LoadedModel, corpus: str, args) -> float:
    """Seconds of the loaded model's own forward passes on exactly the job's batches of `corpus`.

    Job time over this is the pipeline's own overhead: tokenization, bucketing, the reduction,
    Arrow conversion and writing, to the extent they are not hidden behind the model.
    """
    from lib.extract import corpus as corpus_lib

    config = job_config(lm.identity["path"], corpus, "unused", args)
    task = models.task_for(lm, config.decoder, has_targets=False)
    table = corpus_lib.read_unit(
        corpus_lib.plan_units(corpus_lib.inspect_inputs(config.input), 10**9)[0], config.input
    ).table
    requests = batching.tokenize_unit(
        table, lm.tokenizer, task, "", args.max_length, lm.decoder_start_token_id
    ).requests
    multiple = batching.pad_multiple_for(lm.device)  # the job's own batches
    batches = [
        batching.collate(b, lm.pad_id, multiple)
        for b in batching.make_batches(requests, args.max_tokens, multiple=multiple)
    ]
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    device = lm.device
    sync()
    started = time.perf_counter()
    for batch in batches:
        kwargs = {"input_ids": batch.input_ids.to(device)}
        if lm.is_seq2seq:  # as the job: a causal model runs unmasked (SDPA's causal kernel)
            kwargs["attention_mask"] = batch.attention_mask.to(device)
        if batch.decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = batch.decoder_input_ids.to(device)
        lm.model(**kwargs, use_cache=False).logits.float()
    sync()
    return time.perf_counter() - started
