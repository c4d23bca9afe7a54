"""Supervised fine-tuning data (data=sft): assistant-only labels, prompt/completion pairs, length
limits, bad input, loss parity with transformers, and 4 ranks == 1 process.

The hand-built checks use a merge-free byte-level tokenizer made here: token id = byte value,
plus the specials <|im_start|> = 256 and <|im_end|> = 257, so the expected token ids of a
conversation are written down piece by piece from the text, independently of the chat template
and of transformers. Two Qwen2-style templates render the same text, one with
``{% generation %}`` blocks (transformers' assistant mask) and one without (our prefix-rendering
fallback); both must give exactly the hand-built ids and mask.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_harness import run_distributed
from train_cases import base_overrides, compose, reference_training, tiny_cost_model

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
START_ID, END_ID = 256, 257
TEMPLATE_GEN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE_PREFIX = (  # the same text without the markers
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def make_tokenizer_dir(d: Path, template: str | None, eos: str = IM_END) -> Path:
    """A merge-free byte-level tokenizer (id = byte value; specials 256, 257) saved with
    ``template`` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([IM_START, IM_END])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(d)
    return d


def expected_conversation(messages) -> tuple[list[int], list[bool]]:
    """Hand-built ids and assistant mask of the Qwen2-style rendering: for every message
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; trained: an assistant's content, <|im_end|>, \\n."""
    ids, mask = [], []
    for m in messages:
        trained = m["role"] == "assistant"
        for piece, is_target in (
            (IM_START, False),
            (f"{m['role']}\n", False),
            (m["content"], trained),
            (IM_END, trained),
            ("\n", trained),
        ):
            piece_ids = {IM_START: [START_ID], IM_END: [END_ID]}.get(piece, list(piece.encode()))
            ids += piece_ids
            mask += [is_target] * len(piece_ids)
    return ids, mask


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_source(tmp_path, paths, tokenizer, **kw):
    from flexsp.data import CorpusConfig, DataConfig, build_source

    corpus = {k: kw.pop(k) for k in ("max_doc_tokens", "append_eos") if k in kw}
    cfg = DataConfig(
        source="sft",
        sft_path=[str(p) for p in paths],
        corpus=CorpusConfig(tokenizer=str(tokenizer), cache_dir=str(tmp_path / "cache"), **corpus),
        **kw,
    )
    return build_source(cfg)


def expected_labels(ids, mask) -> list[int]:
    """Next token where it is trained, -100 elsewhere and on the last token."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,method", [(TEMPLATE_GEN, "generation"), (TEMPLATE_PREFIX, "prefix")])
def test_assistant_labels_token_by_token(tmp_path, template, method):
    from flexsp.data import GlobalBatchSampler, pack_documents

    tok = make_tokenizer_dir(tmp_path / "tok", template)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    src = sft_source(
        tmp_path,
        [write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}, {"messages": short}])],
        tok,
    )
    assert src.mask_method == method and src.num_docs == 2
    for i, conv in enumerate((CONVERSATION, short)):
        ids, mask = expected_conversation(conv)
        assert src.tokens(i).tolist() == ids  # token by token
        assert src.target_mask(i).tolist() == mask
        assert int(src.target_counts[i]) == sum(mask[1:])
    # the trained text is exactly the assistant turns with their end-of-turn tokens
    hf = transformers.AutoTokenizer.from_pretrained(str(tok))
    assert hf.decode(src.tokens(0)[src.target_mask(0)]) == "4.<|im_end|>\n6, of course.<|im_end|>\n"
    packed = pack_documents(src, [0, 1])
    ids0, mask0 = expected_conversation(CONVERSATION)
    ids1, mask1 = expected_conversation(short)
    assert packed.labels.tolist() == expected_labels(ids0, mask0) + expected_labels(ids1, mask1)
    batch = next(
        GlobalBatchSampler(src.lengths, global_batch_tokens=10_000, shuffle=False, targets=src.target_counts)
    )
    assert batch.targets == (sum(mask0[1:]), sum(mask1[1:]))
    assert batch.num_targets == packed.num_targets == int((packed.labels != -100).sum())


def test_generation_and_prefix_methods_agree_on_a_bpe_with_merges(tmp_path):
    """A BPE whose merges cross the turn boundaries: both methods mark the same tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [m["content"] for m in CONVERSATION] * 20 + ["assistant\n4. user\nAnd", "course.\nWhat"] * 20
    convs = [
        CONVERSATION,
        CONVERSATION[:3],
        [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6, of course. 4."}],
    ]
    got = {}
    for name, template in (("gen", TEMPLATE_GEN), ("prefix", TEMPLATE_PREFIX)):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=[IM_START, IM_END],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END)
        fast.chat_template = template
        fast.save_pretrained(tmp_path / name)
        src = sft_source(
            tmp_path, [write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])], tmp_path / name
        )
        got[name] = [(src.tokens(i).tolist(), src.target_mask(i).tolist()) for i in range(src.num_docs)]
        assert src.mask_method == ("generation" if name == "gen" else "prefix")
        assert fast.decode(src.tokens(2)[src.target_mask(2)]).startswith("6, of course. 4.")
    assert got["gen"] == got["prefix"]


def test_prompt_completion_pairs(tmp_path):
    from flexsp.data import pack_documents

    tok = make_tokenizer_dir(tmp_path / "tok", None)  # no chat template needed for pairs
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Say hi.", "completion": " Hi there"}]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for append_eos in (True, False):
        src = sft_source(tmp_path, [f], tok, append_eos=append_eos)
        assert src.mask_method == "completion"
        for i, r in enumerate(rows):
            p = list(r["prompt"].encode())
            c = list(r["completion"].encode()) + ([END_ID] if append_eos else [])
            assert src.tokens(i).tolist() == p + c
            assert src.target_mask(i).tolist() == [False] * len(p) + [True] * len(c)
        ids, mask = src.tokens(0).tolist(), src.target_mask(0).tolist()
        assert pack_documents(src, [0]).labels.tolist() == expected_labels(ids, mask)


def test_save_to_disk_and_parquet_give_the_jsonl_store(tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok", TEMPLATE_GEN)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    ref = sft_source(tmp_path, [write_jsonl(tmp_path / "c.jsonl", rows)], tok)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "c.parquet"))
    for path in (tmp_path / "saved", tmp_path / "c.parquet"):
        src = sft_source(tmp_path, [path], tok)
        assert [src.tokens(i).tolist() for i in range(2)] == [ref.tokens(i).tolist() for i in range(2)]
        for i in range(2):
            assert src.target_mask(i).tolist() == ref.target_mask(i).tolist()


def test_length_limits_drop_or_truncate_with_counts(tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok", TEMPLATE_GEN)
    late = [{"role": "user", "content": "u" * 90}, {"role": "assistant", "content": "late"}]
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"messages": late}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    full = [expected_conversation(r["messages"]) for r in rows]
    # by hand: 24 + 20 + 15 + 16 + 26 tokens; 24 + 20 + 15; 98 + 17 (the assistant turn starts at 98)
    assert [len(ids) for ids, _ in full] == [101, 59, 115]
    src = sft_source(tmp_path, [f], tok, max_doc_tokens=80)
    assert src.lengths.tolist() == [59] and src.target_counts.tolist() == [sum(full[1][1][1:])]
    assert src.report == [
        "data sft: dropped 2 of 3 conversation(s) longer than 80 tokens "
        "(data.corpus.max_doc_tokens=80), the longest 115; data.truncate=true cuts them "
        "instead"
    ]
    cut = sft_source(tmp_path, [f], tok, max_doc_tokens=80, truncate=True)
    # conversation 0 keeps its first assistant turn; conversation 2's only turn starts after token 80
    assert cut.lengths.tolist() == [80, 59] and len(cut.report) == 1
    assert cut.report[0] == (
        "data sft: truncated 2 of 3 conversation(s) longer than 80 tokens "
        "(data.corpus.max_doc_tokens=80) to 80 tokens; dropped 1 of them left without a "
        "trained token"
    )
    ids, mask = full[0]
    assert cut.tokens(0).tolist() == ids[:80] and cut.target_mask(0).tolist() == mask[:80]
    assert cut.target_counts.tolist() == [sum(mask[1:80]), sum(full[1][1][1:])] == [4, 4]
    # a second limit (the cluster's) stacks on the first, and its line is kept too
    both = cut.fit(70, False, "cluster")
    assert both.lengths.tolist() == [59] and len(both.report) == 2 and "(cluster)" in both.report[1]
    with pytest.raises(ValueError, match="no conversation is left"):
        both.fit(10, False, "tiny cluster")


@pytest.mark.parametrize(
    "case,needle",
    [
        ("no_template", "has no chat template"),
        (
            "null_messages",
            "c.jsonl row 1 ('messages'): expected a non-empty list of {'role', 'content'} messages, got null",
        ),
        (
            "unknown_role",
            "c.jsonl row 0 ('messages') message 1: role 'bot'; valid roles: ['system', 'user', "
            "'assistant', 'tool']",
        ),
        ("empty_assistant", "c.jsonl row 0 ('messages') message 1: empty assistant turn"),
        ("no_assistant", "c.jsonl row 0 ('messages'): no assistant message"),
        ("content_not_string", "message 0 (user): 'content' must be a string, got list"),
        (
            "no_columns",
            "needs a column 'messages' (data.messages_column) or columns ['prompt', 'completion']",
        ),
        ("bpe_tokenizer", "is not a model directory"),
        ("not_prefix_stable", "row 0 ('messages') message 1: the chat template of"),
        ("ignores_generation_prompt", "ignores add_generation_prompt"),
        ("empty_completion", "c.jsonl row 0: empty completion"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, case, needle):
    template = {
        "no_template": None,
        # the last assistant turn rendered differently from earlier ones (as templates that
        # strip reasoning from earlier turns do)
        "not_prefix_stable": TEMPLATE_PREFIX.replace(
            "{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %}!{% endif %}"
        ),
        "ignores_generation_prompt": TEMPLATE_PREFIX.split("{% if add_generation_prompt")[0],
    }.get(case, TEMPLATE_PREFIX)
    tok = make_tokenizer_dir(tmp_path / "tok", template)
    ok = {"messages": CONVERSATION[1:3]}
    rows = {
        "null_messages": [ok, {"other": 1}],
        "unknown_role": [{"messages": [CONVERSATION[1], {"role": "bot", "content": "x"}]}],
        "empty_assistant": [{"messages": [CONVERSATION[1], {"role": "assistant", "content": " "}]}],
        "no_assistant": [{"messages": CONVERSATION[:2]}],
        "content_not_string": [
            {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": ["b"]}]}
        ],
        "no_columns": [{"text": "plain"}],
        "not_prefix_stable": [{"messages": CONVERSATION[1:]}],
        "empty_completion": [{"prompt": "Q", "completion": ""}],
    }.get(case, [ok])
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(ValueError) as err:
        sft_source(tmp_path, [f], "bpe" if case == "bpe_tokenizer" else tok)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_chat_template_file_replaces_the_tokenizers(tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok", None)
    (tmp_path / "t.jinja").write_text(TEMPLATE_GEN)
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    src = sft_source(tmp_path, [f], tok, chat_template=str(tmp_path / "t.jinja"))
    assert src.mask_method == "generation"
    assert src.tokens(0).tolist() == expected_conversation(CONVERSATION)[0]
    with pytest.raises(ValueError, match="data.chat_template=.* is not a file"):
        sft_source(tmp_path, [f], tok, chat_template=str(tmp_path / "missing.jinja"))


def test_loss_equals_transformers_with_the_same_labels(tmp_path):
    """Our packed, assistant-only loss == transformers' loss on each conversation alone with
    labels = its ids where trained, -100 elsewhere (transformers shifts them itself), weighted by
    trained tokens. fp32 on both sides; only the summation order differs: rtol 1e-5."""
    from flexsp.data import pack_documents
    from flexsp.model import shard_inputs
    from flexsp.model.hf import from_hf

    d = make_tokenizer_dir(tmp_path / "llama", TEMPLATE_PREFIX)
    cfg = transformers.LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=END_ID,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    convs = [
        CONVERSATION,
        CONVERSATION[1:3],
        [
            {"role": "user", "content": "Name three colours."},
            {"role": "assistant", "content": "Red, green, blue."},
        ],
    ]
    src = sft_source(tmp_path, [write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])], d)
    packed = pack_documents(src, [0, 1, 2])
    ours = from_hf(d, dtype="float32")
    with torch.no_grad():
        loss_sum, count = shard_inputs(packed.input_ids, packed.cu_seqlens, labels=packed.labels).loss(ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    total, trained = 0.0, 0
    with torch.no_grad():
        for i in range(3):
            ids = torch.as_tensor(src.tokens(i).astype(np.int64))
            labels = ids.masked_fill(~torch.as_tensor(np.array(src.target_mask(i))), -100)
            n = int((labels[1:] != -100).sum())
            total += float(hf(input_ids=ids[None], labels=labels[None]).loss) * n
            trained += n
    assert int(count) == trained == int(src.target_counts.sum())
    torch.testing.assert_close(float(loss_sum) / int(count), total / trained, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
def _train_body(rank, world, cfgs):
    from flexsp.train import run

    out = {}
    for name, cfg in cfgs.items():
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            s = run(cfg, return_state=True)
        state = {k: v.numpy().copy() for k, v in s["state_dict"].items()} if rank == 0 else None
        out[name] = {"losses": s["losses"], "log": log.getvalue(), "state": state}
    return out


def _conversations(n: int, seed: int = 0) -> list[dict]:
    """Conversations of at most 125 tokens (1-2 exchanges, random lowercase words)."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join("".join(rng.choice(list("abcdefgh"), rng.integers(1, 6))) for _ in range(k))
    rows = []
    while len(rows) < n:
        msgs = [] if rng.random() < 0.5 else [{"role": "system", "content": words(1)}]
        for _ in range(int(rng.integers(1, 3))):
            msgs += [
                {"role": "user", "content": words(int(rng.integers(1, 5)))},
                {"role": "assistant", "content": words(int(rng.integers(1, 6)))},
            ]
        if len(expected_conversation(msgs)[0]) <= 125:
            rows.append({"messages": msgs})
    return rows


@pytest.mark.slow
def test_sft_4_ranks_match_single_process(tmp_path):
    """3 SFT steps on 4 ranks (plans mixing SP degrees; the cluster holds 4 x 32 = 128 tokens)
    == 1-process training on the same batches (losses and final parameters; tolerances as in
    tests/test_train.py: fp32, the sums only reordered); a conversation longer than the cluster
    is dropped and counted in the log; with data.truncate=true it is cut and still equal."""
    tok = make_tokenizer_dir(tmp_path / "tok", TEMPLATE_PREFIX)
    long_early = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 150}]}
    long_late = {
        "messages": [{"role": "user", "content": "q" * 150}, {"role": "assistant", "content": "late"}]
    }
    rows = _conversations(22)
    rows[3:3], rows[11:11] = [long_early], [long_late]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    cm = tiny_cost_model(tmp_path / "cm32.json", capacity=32)
    sft = [
        "data=sft",
        f"data.sft_path=[{data}]",
        f"data.corpus.tokenizer={tok}",
        f"data.corpus.cache_dir={tmp_path / 'cache'}",
    ]
    cfgs = {
        "drop": compose(base_overrides(tmp_path / "drop", cm, data=sft)),
        "cut": compose(base_overrides(tmp_path / "cut", cm, steps=2, data=[*sft, "data.truncate=true"])),
    }
    results = run_distributed(_train_body, world_size=4, args=(cfgs,), timeout=240)

    from flexsp.data import build_source

    why = "the cluster holds 4 ranks x 32 tokens under cost model tiny-cap32"
    logs = {name: results[0][name]["log"] for name in cfgs}
    assert f"dropped 2 of 24 conversation(s) longer than 128 tokens ({why})" in logs["drop"], logs["drop"]
    assert (
        f"truncated 2 of 24 conversation(s) longer than 128 tokens ({why}) to 128 tokens; dropped 1 "
        f"of them left without a trained token" in logs["cut"]
    ), logs["cut"]
    assert all(not r[name]["log"] for r in results[1:] for name in cfgs)  # rank 0 logs
    lines = (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()
    plans = " ".join(json.loads(ln)["plan"] for ln in lines)
    assert sum(f"x{d}" in plans for d in (1, 2, 4)) >= 2, plans
    for name, steps in (("drop", 3), ("cut", 2)):
        c = cfgs[name]
        source = build_source(c.data).fit(128, c.data.truncate, why)
        assert source.num_docs == 22 + (name == "cut")
        ref_losses, ref_state = reference_training(cfgs[name], steps, source=source)
        metrics = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        ref_targets = [int(sum(source.target_counts[d] for d in m["doc_ids"])) for m in metrics]
        assert [m["targets"] for m in metrics] == ref_targets  # the trained tokens, not L - 1
        assert all(t < m["tokens"] - m["docs"] for t, m in zip(ref_targets, metrics))
        for r in results:
            got = [r[name]["losses"][s] for s in range(steps)]
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        state = {k: torch.from_numpy(v) for k, v in results[0][name]["state"].items()}
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-4, msg=k)
            assert (state[k] - ref_state[k]).norm() / ref_state[k].norm() < 1e-4, k


def test_pretraining_labels_and_targets_are_unchanged():
    """No target mask: labels and the global batch's target count are pre-training's (L - 1 per
    document); an all-True mask gives the same labels."""
    from flexsp.data import GlobalBatchSampler
    from flexsp.model import lm_labels

    ids, cu = torch.arange(10, 20), [0, 4, 4, 10]
    plain = lm_labels(ids, cu)
    assert plain.tolist() == [11, 12, 13, -100, 15, 16, 17, 18, 19, -100]
    assert torch.equal(lm_labels(ids, cu, torch.ones(10, dtype=torch.bool)), plain)
    batch = next(GlobalBatchSampler([5, 7, 3], global_batch_tokens=100, shuffle=False))
    assert batch.targets is None and batch.num_targets == 4 + 6 + 2
