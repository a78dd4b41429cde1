"""Conversations (input.messages_column) through the chat template: the templated tokens, rows for
the chosen roles only, their values against an unbatched float64 forward, skips and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from jobs import extract
from lib import results, sample
from lib.extract import chat
from lib.sample import generated
from tests.reference import load

MAX_LENGTH = 320


def conversation(seed: int, turns: int, system: bool = True) -> list[dict]:
    words = sample.generate_texts(2 * turns + 1, seed=seed, mean_words=4)
    messages = [{"role": "system", "content": words[0]}] if system else []
    for turn in range(turns):
        messages.append({"role": "user", "content": words[2 * turn + 1]})
        messages.append({"role": "assistant", "content": words[2 * turn + 2]})
    return messages


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, texts) -> str:
    return str(generated.build_chat_causal(tmp_path_factory.mktemp("chat") / "model", texts))


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> dict:
    """Conversations as structs and as JSON text, with rows that cannot be scored."""
    root = tmp_path_factory.mktemp("conversations")
    rows = [conversation(500 + i, turns=1 + i % 3, system=i % 2 == 0) for i in range(14)]
    rows[3] = [{"role": "user", "content": "Kala mon pou ti?"}]  # no assistant message
    rows[5] = None
    rows[8] = []
    rows[11] = conversation(600, turns=12)  # cut at MAX_LENGTH, inside an assistant message
    ids = [f"c{i:02d}" for i in range(len(rows))]
    struct = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    pq.write_table(
        pa.table({"doc_id": ids, "messages": pa.array(rows, struct)}), root / "structs.parquet"
    )
    text = [None if r is None else json.dumps(r) for r in rows]
    text[7] = "[{not json"
    pq.write_table(pa.table({"doc_id": ids, "messages": text}), root / "json.parquet")
    return {"root": root, "rows": dict(zip(ids, rows, strict=True))}


def run_job(model: str, corpus: Path, out: Path, *extra: str) -> int:
    return extract.main(
        [
            "--config",
            "configs/causal-lm.yaml",
            f"model.path={model}",
            f"input.path={corpus}",
            "input.messages_column=messages",  # the config's text column is the default's
            f"input.max_length={MAX_LENGTH}",
            f"output.dir={out}",
            "output.k=4",
            "output.report=false",
            "batching.max_tokens=700",
            *extra,
        ]
    )


def assistants(model: str, conversations: dict, out: Path, *extra: str) -> int:
    """The job on the struct conversations, scoring the assistant's tokens only."""
    corpus = conversations["root"] / "structs.parquet"
    return run_job(model, corpus, out, "input.score_roles=[assistant]", *extra)


def roles_by_piece(tok, messages: list[dict]) -> tuple[list[int], list[str]]:
    """The ChatML tokens built piece by piece, independently of the job, and what each token is:
    `<role>:header`, `<role>:content` or `<role>:close` (`bos` first)."""
    ids, kinds = [tok.bos_token_id], ["bos"]
    for message in messages:
        for text, kind in (
            (f"<|im_start|>{message['role']}\n", "header"),
            (message["content"], "content"),
            ("<|im_end|>\n", "close"),
        ):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            kinds += [f"{message['role']}:{kind}"] * len(piece)
    return ids, kinds


@torch.inference_mode()
def check_values(arrays: dict, row_id: str, model, ids: list[int], probe_ids: list[int]) -> int:
    """A conversation's rows against a float64 forward of its templated tokens; how many."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = logits.log_softmax(-1)
    found = np.flatnonzero(arrays["id"] == row_id)
    for i in found:
        p = int(arrays["position"][i])
        assert arrays["token_id"][i] == ids[p + 1]
        assert abs(arrays["token_logprob"][i] - float(logp[p, ids[p + 1]])) < 1e-4
        np.testing.assert_allclose(arrays["probe_logprobs"][i], logp[p, probe_ids], atol=1e-4)
        assert abs(arrays["logsumexp_t"][i][0] - float(torch.logsumexp(logits[p] / 2, -1))) < 1e-4
        drawn = arrays["sample_ids"][i].astype(np.int64)
        np.testing.assert_allclose(arrays["sample_logprobs"][i], logp[p, drawn].numpy(), atol=1e-4)
    return len(found)


def test_assistant_rows_equal_an_unbatched_float64_forward(chat_model, conversations, tmp_path):
    out = tmp_path / "out"
    probes = [" ba", " be"]
    settings = [f"output.probes={json.dumps(probes)}", "output.temperatures=[2.0]"]
    assert assistants(chat_model, conversations, out, *settings, "output.samples=4") == 0
    tok = AutoTokenizer.from_pretrained(chat_model)
    model = load(chat_model)[0].double()
    probe_ids = [tok(p, add_special_tokens=False)["input_ids"][0] for p in probes]
    frame = results.load_frame(out)
    arrays = results.load_arrays(out)
    seen = 0
    for row_id, messages in conversations["rows"].items():
        rows = frame[frame["id"] == row_id]
        if not messages or row_id == "c03":
            assert rows.empty
            continue
        ids, kinds = roles_by_piece(tok, messages)
        # The job's sequence is apply_chat_template's, which the pieces rebuild.
        assert tok.apply_chat_template(messages)["input_ids"] == ids
        ids, kinds = ids[:MAX_LENGTH], kinds[:MAX_LENGTH]
        expected = [
            p
            for p in range(len(ids) - 1)
            if kinds[p + 1] in ("assistant:content", "assistant:close")
        ]
        assert rows["position"].tolist() == expected, row_id
        assert not {kinds[p + 1] for p in rows["position"]} & {
            "system:content",
            "user:content",
            "assistant:header",
        }
        seen += check_values(arrays, row_id, model, ids, probe_ids)
    assert seen > 150
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"]["truncated_rows"] == 1
    skipped = pd.read_parquet(out / "_skipped").set_index("id")["reason"].to_dict()
    assert skipped == {"c03": "no_scored_role", "c05": "null_messages", "c08": "empty_messages"}


def test_every_position_without_roles_and_json_text_reads_the_same(
    chat_model, conversations, tmp_path
):
    structs, text = tmp_path / "structs", tmp_path / "text"
    assert run_job(chat_model, conversations["root"] / "structs.parquet", structs) == 0
    assert run_job(chat_model, conversations["root"] / "json.parquet", text) == 0
    tok = AutoTokenizer.from_pretrained(chat_model)
    frame = results.load_frame(structs)
    for row_id, messages in conversations["rows"].items():
        if messages:
            ids = tok.apply_chat_template(messages)["input_ids"][:MAX_LENGTH]
            rows = frame[frame["id"] == row_id]
            assert rows["position"].tolist() == list(range(len(ids)))
            assert rows["token_id"].tolist()[:-1] == ids[1:]
    from_text = results.load_frame(text)
    assert set(from_text["id"]) == set(frame["id"]) - {"c07"}
    same = frame[frame["id"] != "c07"].reset_index(drop=True)
    pd.testing.assert_frame_equal(from_text, same)
    skipped = pd.read_parquet(text / "_skipped").set_index("id")["reason"].to_dict()
    assert skipped == {"c05": "null_messages", "c07": "invalid_messages", "c08": "empty_messages"}
    joined = results.join_input(text)  # the conversation beside each row, by default
    assert joined.columns[-1] == "messages" and joined["messages"].notna().all()


def test_document_scores_cover_the_scored_roles(chat_model, conversations, tmp_path):
    out = tmp_path / "out"
    assert assistants(chat_model, conversations, out, "output.level=both") == 0
    docs = results.load_documents(out).set_index("id")
    tokens = results.load_frame(out)
    assert (docs["n_tokens"] == tokens.groupby("id").size()).all()
    messages = conversations["rows"]["c01"]
    closes = sum(1 for m in messages if m["role"] == "assistant")
    content = sum(len(m["content"].encode()) for m in messages if m["role"] == "assistant")
    assert docs.loc["c01", "n_bytes"] == content + closes * len("<|im_end|>\n")


def test_spans_find_the_last_occurrence_inside_a_message(chat_model):
    """A template's system prompt holding the assistant's words does not move its rows."""
    tok = AutoTokenizer.from_pretrained(chat_model)
    template = generated.CHATML.replace("{{ bos_token }}", "{{ bos_token }}Ba ba.")
    messages = [{"role": "user", "content": "Ko?"}, {"role": "assistant", "content": "Ba ba."}]
    (found,) = chat.tokenize([messages], tok, template, ["assistant"], 512)
    rendered = tok.apply_chat_template(messages, tokenize=False, chat_template=template)
    start = rendered.rindex("Ba ba.")
    offsets = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert min(offsets[t][0] for t in found.scored) == start
    assert found.n_bytes == len(rendered[start:].encode())


@pytest.mark.parametrize("reply", ["d", "end", "im_end", "m", "user", "Ko?"])
def test_a_reply_found_in_a_tag_or_a_header_keeps_its_rows(chat_model, reply):
    """A short reply that also occurs in the closing tag, the header or the user's words: its
    rows are its own content's tokens and the closing text, nothing else."""
    tok = AutoTokenizer.from_pretrained(chat_model)
    messages = [
        {"role": "user", "content": "Ko? Pick a, b, c or d, user"},
        {"role": "assistant", "content": reply},
    ]
    (found,) = chat.tokenize([messages], tok, None, ["assistant"], 512)
    ids, kinds = roles_by_piece(tok, messages)
    assert found.ids == ids
    assert found.scored == [t for t, kind in enumerate(kinds) if kind.startswith("assistant:c")]
    assert found.n_bytes == len(f"{reply}<|im_end|>\n".encode())


def test_a_template_that_ends_the_sequence_after_the_last_message(chat_model):
    """A template whose rendering up to a message is not a prefix of the whole (the end-of-
    sequence token comes after the last message only): each assistant message's rows are its
    content and `<|im_end|>\n`, the last one's also `</s>`; a reply equal to its role's name
    is found in the content, not in the header."""
    tok = AutoTokenizer.from_pretrained(chat_model)
    template = generated.CHATML.replace(
        "<|im_end|>\n{% endfor %}",
        "<|im_end|>\n{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}",
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "end"},
        {"role": "assistant", "content": "bye"},
    ]
    (found,) = chat.tokenize([messages], tok, template, ["assistant"], 512)
    ids, kinds = roles_by_piece(tok, messages)
    assert found.ids == [*ids, tok.eos_token_id]
    expected = [t for t, kind in enumerate(kinds) if kind.startswith("assistant:c")]
    assert found.scored == [*expected, len(ids)]


@pytest.mark.parametrize(
    "extra, model, message",
    [
        ([], "t5", "conversations are scored with causal models; this model is seq2seq"),
        ([], "gpt2", "the tokenizer has no chat template; give one with input.chat_template"),
        (["input.text_column=text"], "chat", "drop input.text_column ('text', or set"),
        (["input.score_roles=[]"], "chat", "input.score_roles: name at least one role"),
        (["input.chat_template=no/such/file.jinja"], "chat", "nor a readable file"),
        (["input.chat_template={% for m in messages %}"], "chat", "does not compile"),
    ],
)
def test_refusals_are_one_line(
    chat_model, model_dirs, conversations, tmp_path, capsys, extra, model, message
):
    path = chat_model if model == "chat" else model_dirs[model]
    assert run_job(path, conversations["root"] / "structs.parquet", tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_keys_that_need_conversations_are_refused(tmp_path, capsys):
    base = ["model.path=m", "input.path=i", f"output.dir={tmp_path}"]
    for extra, message in (
        (["input.score_roles=assistant"], "input.score_roles applies to conversations"),
        (["input.messages_column=m", "input.prefix=x"], "drop input.prefix"),
        (["input.messages_column=m", "input.long_documents=windows"], "scores plain texts"),
        (["input.text_column=null"], "input.text_column is required"),
    ):
        assert extract.main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_messages_column_of_another_type_is_refused(chat_model, tmp_path, capsys):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "b"], "messages": [1, 2]}), path)
    assert run_job(chat_model, path, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "input.messages_column: column 'messages'" in err and "has type int64" in err


def test_conversation_keys_enter_the_fingerprint_only_when_set(tmp_path):
    from lib.config import load_config
    from lib.output.resume import changed_settings, fingerprint

    base = ["model.path=m", "input.path=i", "output.dir=o"]
    chat_keys = [*base, "input.messages_column=messages"]
    template = tmp_path / "template.jinja"
    template.write_text(generated.CHATML)

    def print_of(*settings: str) -> str:
        return fingerprint(load_config(None, list(settings)), [], {"identity": {}, "files": []})

    assert print_of(*base) == print_of(*base, "input.score_roles=null")
    prints = {
        print_of(*base),
        print_of(*chat_keys),
        print_of(*chat_keys, "input.score_roles=[assistant]"),
        print_of(*chat_keys, f"input.chat_template={template}"),
    }
    template.write_text(generated.CHATML.replace("<|im_end|>", "<|im_end|> "))  # other bytes
    prints.add(print_of(*chat_keys, f"input.chat_template={template}"))
    assert len(prints) == 5
    then = {"config": load_config(None, chat_keys).to_dict()}
    now = load_config(None, [*chat_keys, "input.score_roles=[assistant]"])
    assert changed_settings(then, now) == 'input.score_roles: null, now ["assistant"]'
