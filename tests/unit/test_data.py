"""`npu-dsv3 data preprocess` and the datasets training reads.

Oracles: the HF tokenizer's own ids (pretraining text) and the DeepSeek-V3 Jinja chat
template rendered by transformers' ``apply_chat_template`` (instruction data: ids, and where
the prompt ends). The tokenizer is trained on the bundled corpus with DeepSeek-V3's special
tokens; nothing is downloaded.
"""

import filecmp
import json
import os

import numpy
import pytest

from npu_dsv3.cli import main
from npu_dsv3.data import corpus
from npu_dsv3.data.handlers import IGNORE_INDEX

ALPACA, SHAREGPT = "AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler"


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return corpus.build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def hf(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def preprocess(capsys, *argv):
    """Runs the CLI in-process; returns (exit code, summary dict or None, stderr)."""
    code = main(["data", "preprocess", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def records(name):
    with open(corpus.path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- pretraining text


def test_pretrain_round_trip_gives_the_tokenizers_ids(tmp_path, capsys, tok_dir, hf):
    code, summary, _ = preprocess(capsys, "--input", corpus.path("pretrain.jsonl"), "--tokenizer-name-or-path",
                                  tok_dir, "--output-prefix", tmp_path / "pre", "--append-eod")
    assert code == 0
    ds = indexed(f"{tmp_path}/pre_text_document")
    texts = [r["text"] for r in records("pretrain.jsonl")]
    assert len(ds) == summary["documents"] == summary["records"] == len(texts)
    assert ds.index.dtype == numpy.uint16  # megatron's choice below 65500 ids
    expected = [ids + [hf.eos_token_id] for ids in hf(texts)["input_ids"]]
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert expected[0][0] == hf.bos_token_id  # the model tokenizer's own bos is kept
    assert summary["tokens"] == sum(map(len, expected)) and summary["malformed"] == 0


def test_parquet_input_matches_jsonl(tmp_path, capsys, tok_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = records("pretrain.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=70)
    for name, source in (("pq", tmp_path / "in.parquet"), ("js", corpus.path("pretrain.jsonl"))):
        assert preprocess(capsys, "--input", source, "--tokenizer-name-or-path", tok_dir,
                          "--output-prefix", tmp_path / name, "--workers", 2)[0] == 0
    for ext in ("bin", "idx"):
        assert filecmp.cmp(f"{tmp_path}/pq_text_document.{ext}", f"{tmp_path}/js_text_document.{ext}", shallow=False)


# --------------------------------------------------------------------------- instruction data


def alpaca_messages(r):
    messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    for q, a in r.get("history", []):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = f"{r['instruction']}\n{r['input']}" if r.get("input") else r["instruction"]
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def sharegpt_messages(r):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    return messages + [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]


def template_oracle(hf, messages):
    """ids of the Jinja-rendered conversation, and labels: -100 up to and including each
    '<｜Assistant｜>', the reply and its eos trained."""
    def ids(msgs, generation_prompt=False):
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return hf(text, add_special_tokens=False)["input_ids"]

    full = ids(messages)
    labels = list(full)
    done = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt_end = len(ids(messages[:i], generation_prompt=True))
            labels[done:prompt_end] = [IGNORE_INDEX] * (prompt_end - done)
            done = len(ids(messages[: i + 1]))
    return full, labels


@pytest.mark.parametrize("handler, name, to_messages", [(ALPACA, "alpaca.jsonl", alpaca_messages),
                                                         (SHAREGPT, "sharegpt.jsonl", sharegpt_messages)])
def test_instruction_labels_mask_exactly_the_prompt(tmp_path, capsys, tok_dir, hf, handler, name, to_messages):
    code, summary, _ = preprocess(capsys, "--input", corpus.path(name), "--tokenizer-name-or-path", tok_dir,
                                  "--output-prefix", tmp_path / "sft", "--handler-name", handler)
    assert code == 0
    ds = {k: indexed(f"{tmp_path}/sft_packed_{k}_document") for k in ("input_ids", "labels", "attention_mask")}
    rows = records(name)
    assert len(ds["input_ids"]) == summary["documents"] == len(rows)
    assert any(r.get("system") for r in rows) and any(len(to_messages(r)) > 3 for r in rows)
    for i, r in enumerate(rows):
        ids, labels = template_oracle(hf, to_messages(r))
        assert ds["input_ids"][i].tolist() == ids, i
        assert ds["labels"][i].tolist() == labels, i
        assert ds["attention_mask"][i].tolist() == [1] * len(ids)
        assert ids[-1] == hf.eos_token_id and labels[-1] == hf.eos_token_id and labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("reset", [True, False])
def test_packing_respects_seq_length_and_documents(tmp_path, capsys, tok_dir, reset):
    from npu_dsv3.data.dataset import InstructionDataset

    seq = 160
    common = ("--input", corpus.path("sharegpt.jsonl"), "--tokenizer-name-or-path", tok_dir,
              "--handler-name", SHAREGPT, "--seq-length", seq)
    code, plain, _ = preprocess(capsys, *common, "--output-prefix", tmp_path / "plain")
    code2, packed, _ = preprocess(capsys, *common, "--output-prefix", tmp_path / "packed", "--pack")
    assert code == code2 == 0 and packed["packed_sequences"] < plain["documents"]
    raw = {k: indexed(f"{tmp_path}/packed_packed_{k}_document") for k in ("input_ids", "labels", "attention_mask")}
    plain_ids = indexed(f"{tmp_path}/plain_packed_input_ids_document")  # kept alive: items view its mmap
    docs = sorted(tuple(plain_ids[i].tolist()) for i in range(len(plain_ids)))

    found = []
    data = InstructionDataset(f"{tmp_path}/packed", reset_attention_mask=reset, create_attention_mask=True)
    for p in range(len(data)):
        ids, labels, doc = (raw[k][p] for k in ("input_ids", "labels", "attention_mask"))
        assert len(ids) == seq
        n = int(doc.max())
        assert doc.tolist() == sorted(doc.tolist(), key=lambda d: d if d else n + 1)  # pad (0) only at the end
        assert all(labels[doc == 0] == IGNORE_INDEX)
        starts = [0] + [int(i) for i in numpy.flatnonzero(numpy.diff(doc)) + 1] + [seq]
        found += [tuple(ids[a:b].tolist()) for a, b in zip(starts, starts[1:]) if doc[a]]

        s = data[p]
        assert s["tokens"].tolist() == ids.tolist()
        if reset:
            assert s["cu_seqlens"].tolist() == starts
            assert s["position_ids"].tolist() == [t - max(a for a in starts if a <= t) for t in range(seq)]
        else:
            assert s["cu_seqlens"].tolist() == [0, seq] and s["position_ids"].tolist() == list(range(seq))
        mask = s["attention_mask"][0]
        for q in range(0, seq, 7):
            visible = [k for k in range(seq) if not mask[q, k]]
            first = max(a for a in starts if a <= q) if reset else 0
            assert visible == list(range(first, q + 1))
        # no label crosses a document end; trained labels are the next token
        for t in range(seq - 1):
            if s["loss_mask"][t]:
                assert doc[t] == doc[t + 1] != 0 and s["labels"][t] == ids[t + 1] == labels[t + 1]
        assert not s["loss_mask"][[b - 1 for b in starts[1:]]].any()
    assert sorted(found) == docs  # every sample exactly once, whole


# --------------------------------------------------------------------------- malformed input


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_malformed_records_are_counted_and_fail_by_default(tmp_path, capsys, tok_dir):
    src = write_lines(tmp_path / "dirty.jsonl", [
        json.dumps({"text": "The river waits."}), "{not json", json.dumps({"body": "no text key"}),
        json.dumps({"text": 42}), json.dumps({"text": "   "}), json.dumps(["a list"]),
        json.dumps({"text": "A red kite paints the first snow."}),
    ])
    args = ("--input", src, "--tokenizer-name-or-path", tok_dir, "--output-prefix", tmp_path / "out")
    code, _, err = preprocess(capsys, *args)
    assert code == 2
    assert "5 of 7 records are malformed" in err and "nothing was written" in err
    assert f"{src}:2: bad JSON" in err  # located by line
    assert not any(n.startswith("out") for n in os.listdir(tmp_path))
    assert not any(n.startswith(".out") for n in os.listdir(tmp_path))  # no temp left behind

    code, summary, _ = preprocess(capsys, *args, "--max-malformed-fraction", 0.8)
    assert code == 0 and summary["documents"] == 2 and summary["malformed"] == 5
    assert summary["malformed_by_reason"] == {"bad JSON": 1, "missing key 'text'": 1, "'text' is int, not a string": 1,
                                              "'text' is empty": 1, "not a JSON object": 1}
    assert len(indexed(f"{tmp_path}/out_text_document")) == 2


def test_broken_conversations_are_counted(tmp_path, capsys, tok_dir):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    src = write_lines(tmp_path / "conv.jsonl", [json.dumps(x) for x in (
        good,
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "robot", "value": "Hi"}]},
        {"conversations": "Hi"},
    )])
    code, summary, _ = preprocess(capsys, "--input", src, "--tokenizer-name-or-path", tok_dir, "--handler-name",
                                  SHAREGPT, "--output-prefix", tmp_path / "c", "--max-malformed-fraction", 1)
    assert code == 0 and summary["documents"] == 1 and summary["malformed"] == 5
    assert summary["malformed_by_reason"] == {
        "bad conversation: last turn is not an assistant reply": 1,
        "bad conversation: turn 0 is 'assistant', expected 'user'": 1,
        "bad conversation: turn 1 (assistant) is empty": 1,
        "unknown role 'robot'": 1, "'conversations' is str, not a list": 1}


def test_bad_flags_are_one_line_errors(tmp_path, capsys, tok_dir):
    src = corpus.path("pretrain.jsonl")
    for extra, message in (
            (("--pack", "--seq-length", 8), "--pack is for instruction handlers"),
            (("--handler-name", ALPACA, "--pack"), "--pack needs --seq-length"),
            (("--handler-name", ALPACA, "--append-eod"), "--append-eod is for pretraining"),
            (("--handler-name", ALPACA, "--map-keys", "[1]"), "--map-keys must be a JSON object")):
        code, _, err = preprocess(capsys, "--input", src, "--tokenizer-name-or-path", tok_dir,
                                  "--output-prefix", tmp_path / "x", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = preprocess(capsys, "--input", tmp_path / "none*.jsonl", "--tokenizer-name-or-path", tok_dir,
                              "--output-prefix", tmp_path / "x")
    assert code == 2 and "no file found" in err


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("handler, name, extra", [
    ("GeneralPretrainHandler", "pretrain.jsonl", ("--append-eod",)),
    (ALPACA, "alpaca.jsonl", ("--pack", "--seq-length", 128)),
])
def test_workers_give_byte_identical_outputs(tmp_path, capsys, tok_dir, handler, name, extra):
    outputs = []
    for workers in (1, 2):
        # 8 KiB chunks: the corpus spans several, cut mid-line
        code, summary, _ = preprocess(capsys, "--input", corpus.path(name), "--tokenizer-name-or-path", tok_dir,
                                      "--handler-name", handler, "--output-prefix", tmp_path / f"w{workers}",
                                      "--workers", workers, "--chunk-mb", 8 / 1024, *extra)
        assert code == 0 and summary["records"] == len(records(name)) and summary["malformed"] == 0
        outputs.append(sorted(n[len(f"w{workers}"):] for n in os.listdir(tmp_path) if n.startswith(f"w{workers}")))
    assert outputs[0] == outputs[1] and len(outputs[0]) in (2, 6)
    for suffix in outputs[0]:
        assert filecmp.cmp(tmp_path / f"w1{suffix}", tmp_path / f"w2{suffix}", shallow=False), suffix


# --------------------------------------------------------------------------- GPTDataset, blended


def test_blended_gpt_datasets_sample_both_prefixes_by_weight(tmp_path, capsys, world1):
    from npu_dsv3.data.dataset import build_pretrain_datasets
    from npu_dsv3.data.tokenizer import load_tokenizer

    rng = numpy.random.default_rng(0)
    for name, low in (("a", 0), ("b", 500)):
        lines = [" ".join(map(str, rng.integers(low, low + 500, rng.integers(5, 40)))) for _ in range(200)]
        write_lines(tmp_path / f"{name}.jsonl", [json.dumps({"text": t}) for t in lines])
        assert preprocess(capsys, "--input", tmp_path / f"{name}.jsonl", "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", 1000, "--output-prefix", tmp_path / name, "--append-eod")[0] == 0

    seq = 16
    train, valid, test = build_pretrain_datasets(
        f"0.25 {tmp_path}/a_text_document 0.75 {tmp_path}/b_text_document", seq_length=seq, sizes=[400, 40, 0],
        tokenizer=load_tokenizer("NullTokenizer", None, 1000), split="90,10,0", path_to_cache=str(tmp_path / "cache"))
    assert len(train) == 400 and len(valid) >= 40 and test is None
    sources = []
    for i in range(len(train)):
        s = train[i]
        assert s["tokens"].shape == (seq,) and s["labels"].shape == (seq,)
        text = numpy.append(s["tokens"].numpy(), s["labels"][-1].item())  # the seq_length + 1 tokens read
        assert (s["tokens"][1:] == s["labels"][:-1]).all()
        body = text[text != 1000]  # eod separates documents
        source = int(body[0] >= 500)
        assert ((body >= 500) == source).all()  # one dataset per sample
        assert int(s["dataset_id"]) == source
        sources.append(source)
    assert abs(sum(sources) / len(sources) - 0.75) < 0.02


def test_the_python_job_has_the_flags_defaults():
    from npu_dsv3.cli import build_parser
    from npu_dsv3.data.preprocess import Job

    args = build_parser().parse_args(["data", "preprocess", "--input", "in.jsonl", "--output-prefix", "out"])
    assert Job.from_args(args) == Job(input="in.jsonl", output_prefix="out")
