"""Supervised fine-tuning rows -> token ids and a per-token *target mask* (True: the loss trains it).

Conversations (lists of ``{"role", "content"}`` messages) are rendered with the tokenizer's chat
template (``transformers``' ``apply_chat_template``), and the tokens of the assistant turns are
marked. Two methods, chosen from the template (the store records which, ``meta["sft"]["mask_method"]``):

* ``generation``: the template wraps what the loss trains in ``{% generation %}...{%
  endgeneration %}`` (the Hugging Face convention); ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` marks the tokens overlapping those blocks.
* ``prefix`` (templates without the markers, most released ones): for every assistant message k,
  the conversation up to message k is rendered with the generation prompt (e.g. ``...<|im_start|>
  assistant\\n``) and up to message k + 1 without it; the text between the two ends is that turn
  (its content and end-of-turn tokens, e.g. ``Hi!<|im_end|>\\n``). The whole conversation is then
  tokenized once (as ``apply_chat_template`` does) and every token overlapping such a span is
  marked: the same rule as the generation method, so both agree on a template whose markers
  enclose exactly those spans. A template that renders earlier turns differently once later
  turns follow (not prefix-stable), or that ignores ``add_generation_prompt``, cannot be read this
  way and is refused with the remedy (a template with ``{% generation %}``: ``data.chat_template``).

Prompt/completion pairs of strings are tokenized as plain text without a template (as TRL's
"standard" prompt-completion form): the prompt with the tokenizer's special tokens (BOS where it
adds one), the completion without, then EOS; the completion and the EOS are trained.

Bad rows raise one ValueError naming the input, the row, the field and what is valid.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flexsp.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a conversation may hold; the loss trains on 'assistant' turns only."""
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "Hi"}]


def load_chat_tokenizer(path: str, chat_template_file: str | None = None, need_template: bool = True):
    """``(tokenizer, chat template text or None)``: the ``transformers`` tokenizer of the model
    directory ``path`` and the template it renders conversations with (``chat_template_file``
    when given, else its own). ValueError naming the directory when either is missing."""
    directory = Path(path)
    if path in ("bpe", "byte") or not directory.is_dir():
        raise UserError(
            f"data=sft renders rows with a Hugging Face tokenizer, but data.corpus.tokenizer="
            f"{path!r} is not a model directory; set model.hf_checkpoint=<model dir> (its "
            f"tokenizer is used) or data.corpus.tokenizer=<a directory with tokenizer.json and "
            f"tokenizer_config.json>"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... on odd directories
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(
            f"tokenizer directory {directory}: transformers could not load a tokenizer "
            f"({type(exc).__name__}: {first}); expected a save_pretrained directory"
        ) from exc
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if chat_template_file:
        f = Path(chat_template_file)
        if not f.is_file():
            raise UserError(f"data.chat_template={chat_template_file} is not a file (a Jinja chat template)")
        template = f.read_text(encoding="utf-8")
    if need_template and not template:
        raise UserError(
            f"tokenizer {directory} has no chat template (no 'chat_template' in "
            f"tokenizer_config.json, no chat_template.jinja), so conversations cannot be "
            f"rendered; set data.chat_template=<a .jinja file>, or use the prompt/completion "
            f"form (data.sft_format=prompt_completion)"
        )
    return tok, template


def check_messages(messages, where: str) -> list[dict]:
    """The conversation ``messages`` (keys with null values dropped) or a ValueError naming
    ``where`` (input, row, column), the message and what is valid."""
    if not isinstance(messages, list) or not messages:
        got = (
            "null"
            if messages is None
            else ("an empty list" if isinstance(messages, list) else type(messages).__name__)
        )
        raise UserError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {got}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(
                f"{where} message {j}: expected a {{'role', 'content'}} object, got {type(m).__name__}"
            )
        m = {k: v for k, v in m.items() if v is not None}
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where} message {j}: role {role!r}; valid roles: {list(ROLES)}")
        if not isinstance(content, str):
            raise UserError(
                f"{where} message {j} ({role}): 'content' must be a string, got "
                f"{'nothing' if content is None else type(content).__name__}"
            )
        if role == "assistant" and not content.strip():
            raise UserError(
                f"{where} message {j}: empty assistant turn; every assistant message needs "
                f"content (the loss trains on it)"
            )
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(
            f"{where}: no assistant message; the loss trains only on assistant turns, so "
            f"a conversation needs at least one"
        )
    return out


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks trained text with ``{% generation %}`` blocks."""
    return bool(_GENERATION_BLOCK.search(template))


def _span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True on tokens (character ``offsets [n, 2]``) overlapping any ``[start, end)`` span."""
    mask = np.zeros(len(offsets), dtype=np.bool_)
    for start, end in spans:
        mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return mask


class ChatRenderer:
    """Renders conversations with ``template`` into token ids and assistant target masks.
    ``method`` is 'generation' or 'prefix' (see the module docstring)."""

    def __init__(self, tokenizer, template: str, name: str):
        self.tok, self.template, self.name = tokenizer, template, name
        self.method = "generation" if has_generation_blocks(template) else "prefix"
        if self.method == "prefix" and self._text(_PROBE, True) == self._text(_PROBE, False):
            raise UserError(
                f"the chat template of {name} ignores add_generation_prompt and has no "
                f"{{% generation %}} blocks, so assistant turns cannot be located; set "
                f"data.chat_template=<a .jinja template with {{% generation %}} around "
                f"what the loss trains>"
            )

    def _text(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, chat_template=self.template, add_generation_prompt=generation_prompt
        )

    def render(
        self, conversations: list[list[dict]], wheres: list[str]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(ids int64 [L], target_mask bool [L])`` per (checked) conversation."""
        if not conversations:
            return []
        if self.method == "generation":
            out = self.tok.apply_chat_template(
                conversations,
                tokenize=True,
                return_dict=True,
                chat_template=self.template,
                return_assistant_tokens_mask=True,
            )
            pairs = [
                (np.asarray(i, np.int64), np.asarray(m, np.bool_))
                for i, m in zip(out["input_ids"], out["assistant_masks"])
            ]
        else:
            texts, spans = zip(*(self._prefix_spans(c, w) for c, w in zip(conversations, wheres)))
            enc = self.tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
            pairs = [
                (np.asarray(i, np.int64), _span_mask(np.asarray(o, np.int64).reshape(-1, 2), s))
                for i, o, s in zip(enc["input_ids"], enc["offset_mapping"], spans)
            ]
        for (ids, mask), where in zip(pairs, wheres):
            if not mask[1:].any():
                raise UserError(
                    f"{where}: the chat template of {self.name} ({self.method} method) marks no "
                    f"token of its assistant turns after the first token; check the "
                    f"template's {{% generation %}} blocks (data.chat_template)"
                )
        return pairs

    def _prefix_spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn in it."""
        full = self._text(messages, False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if k == 0:
                raise UserError(
                    f"{where}: message 0 is an assistant turn; without {{% generation %}} "
                    f"blocks in the chat template a turn is located after the messages "
                    f"before it (start with a system or user message, or set "
                    f"data.chat_template)"
                )
            before, after = self._text(messages[:k], True), self._text(messages[: k + 1], False)
            if not (after.startswith(before) and full.startswith(after)):
                raise UserError(
                    f"{where} message {k}: the chat template of {self.name} renders earlier "
                    f"turns differently once later turns follow (not prefix-stable), so "
                    f"assistant turns cannot be located by rendering prefixes; set "
                    f"data.chat_template=<a .jinja template with {{% generation %}} blocks>"
                )
            spans.append((len(before), len(after)))
        return full, spans


def render_prompt_completion(
    tokenizer, prompts: list, completions: list, wheres: list[str], append_eos: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, target_mask)`` per pair: prompt (with special tokens) + completion (+ EOS); the
    completion and EOS are the targets. ValueError naming the row for a non-string field or an
    empty completion."""
    for p, c, where in zip(prompts, completions, wheres):
        for field, value in (("prompt", p), ("completion", c)):
            if not isinstance(value, str):
                raise UserError(
                    f"{where}: {field} must be a string, got "
                    f"{'null' if value is None else type(value).__name__}"
                )
        if not c.strip():
            raise UserError(f"{where}: empty completion (the loss trains on it)")
    if not prompts:
        return []
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    out = []
    for p, c, where in zip(p_ids, c_ids, wheres):
        ids = np.asarray([*p, *c, *eos], dtype=np.int64)
        mask = np.zeros(ids.size, dtype=np.bool_)
        mask[len(p) :] = True
        if not mask[1:].any():
            raise UserError(
                f"{where}: no completion token can be trained (an empty prompt and a "
                f"one-token completion without EOS)"
            )
        out.append((ids, mask))
    return out
