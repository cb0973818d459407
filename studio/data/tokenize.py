"""Examples -> token ids with a label mask, packing, and a preview of what is trained.

Only the answers (plus EOS) are supervised: a model trained on its prompts learns to write questions,
and one never shown EOS never stops (FIELD-NOTES: "model repeats itself / never stops").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from studio.data.errors import DataError
from studio.data.formats import Example, Message, openai_messages
from studio.data.tools import (
    calls_in_text,
    calls_text,
    observation_text,
    strip_calls,
    template_knows_tools,
    tools_system_text,
)

IGNORE_INDEX = -100  # label value the loss skips (the PyTorch / HF convention)

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool
    full_length: int  # length before truncation

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class PackedSample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restart at 0 where each sample starts
    seq_lens: list[int]  # lengths of the samples packed here, in order


def build_sample(
    tokenizer: Any,
    example: Example,
    cutoff_len: int,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
) -> Sample:
    """Tokenize one example with the chat template, labelling exactly each answer + EOS."""
    if cutoff_len < 1:
        raise DataError(f"cutoff_len must be at least 1, got {cutoff_len}.")
    eos = tokenizer.eos_token
    if not eos:
        raise DataError("The tokenizer has no EOS token, so answers cannot be ended. Set tokenizer.eos_token.")

    if example.text is not None:
        ids = _encode(tokenizer, example.text + eos)
        labels = list(ids)
    else:
        ids, labels = [], []
        for text, trained in chat_segments(tokenizer, example.messages, eos, chat_template, example.tools):
            seg = _encode(tokenizer, text)
            ids += seg
            labels += seg if trained or train_on_prompt else [IGNORE_INDEX] * len(seg)

    full_length = len(ids)
    return Sample(
        input_ids=ids[:cutoff_len],  # keep the beginning: the prompt is what gives the answer meaning
        labels=labels[:cutoff_len],
        truncated=full_length > cutoff_len,
        full_length=full_length,
    )


def chat_segments(
    tokenizer: Any,
    messages: tuple[Message, ...],
    eos: str,
    chat_template: str | None = None,
    tools: str | None = None,
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, supervised) pieces.

    For assistant turn k: prompt_k = template(messages[:k], generation prompt), full_k =
    template(messages[:k+1]); full_k[len(prompt_k):] holds the answer. Supervised = the answer + EOS.
    Tool calls are answers (trained), tool results are prompt (masked). A template that renders `tools`
    gets them as they are; for the others the conversation is first written in the fallback format.
    """
    template = template_for(tokenizer, chat_template)
    messages, tools_arg = tool_conversation(messages, tools, template)
    segments: list[tuple[str, bool]] = []
    done = ""  # text already placed into segments
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], template, add_generation_prompt=True, tools=tools_arg)
        full = _render(tokenizer, messages[: k + 1], template, add_generation_prompt=False, tools=tools_arg)
        if not prompt.startswith(done):
            raise DataError(
                f"The chat template renders the conversation up to turn {k + 1} differently from how it "
                "rendered the earlier turns (the earlier text is not a prefix), so the answers cannot be "
                "located. Use a chat template that renders earlier turns the same way whatever follows."
            )
        if not full.startswith(prompt):
            raise DataError(
                f"The chat template's text for turn {k + 1} does not start with its own generation prompt "
                "(add_generation_prompt=True), so the answer cannot be located. Use a template whose "
                "generation prompt is a prefix of the rendered answer turn."
            )
        answer = full[len(prompt) :]
        if message.tool_calls:  # the template writes the calls its own way: the whole turn is the answer
            at, shown = 0, answer[: answer.index(eos)] if eos in answer else answer.rstrip()
        else:
            at, shown = answer.find(message.content), message.content
        if at < 0:
            raise DataError(
                f"The chat template changes the text of answer {k + 1} (it does not appear verbatim in the "
                "rendered turn), so it cannot be labelled. Use a template that copies the content as is."
            )
        before, rest = answer[:at], answer[at + len(shown) :]
        after = rest[len(eos) :] if rest.startswith(eos) else rest  # EOS is added below, if missing
        segments.append((prompt[len(done) :] + before, False))
        segments.append((shown + eos, True))
        if after:
            segments.append((after, False))
        done = full
    return [(text, trained) for text, trained in segments if text]


def template_for(tokenizer: Any, chat_template: str | None = None) -> str:
    return chat_template or getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def tool_conversation(
    messages: tuple[Message, ...], tools: str | None, template: str
) -> tuple[tuple[Message, ...], list[dict] | None]:
    """(messages, tools argument) for a template: unchanged with the schemas for one that knows tools,
    else in the fallback format (studio.data.tools): schemas in the system turn, calls written into the
    assistant's text, each run of tool results one user turn."""
    uses_tools = tools is not None or any(m.tool_calls or m.role == "tool" for m in messages)
    if not uses_tools:
        return messages, None
    if template_knows_tools(template):
        return messages, json.loads(tools) if tools else None
    out: list[Message] = []
    if tools:
        system = messages[0].content if messages and messages[0].role == "system" else ""
        out.append(Message("system", tools_system_text(tools, system)))
        messages = messages[1:] if system else messages
    results: list[str] = []
    for message in messages:
        if message.role == "tool":
            results.append(message.content)
            continue
        if results:
            out.append(Message("user", observation_text(results)))
            results = []
        out.append(
            Message(message.role, calls_text(message.content, message.tool_calls)) if message.tool_calls else message
        )
    if results:
        out.append(Message("user", observation_text(results)))
    return tuple(out), None


def render_prompt(tokenizer: Any, conversation: list[dict[str, str]], tools: str | None = None) -> str:
    """The generation prompt for a chat, written as training writes it (tools natively or in the fallback)."""
    template = template_for(tokenizer)
    messages = tuple(_chat_message(m["role"], m["content"]) for m in conversation)
    messages, tools_arg = tool_conversation(messages, tools, template)
    return _render(tokenizer, messages, template, add_generation_prompt=True, tools=tools_arg)


def _chat_message(role: str, content: str) -> Message:
    """A chat turn; the calls an assistant wrote in the fallback format become structured calls again, so a
    template that knows tools renders them its own way."""
    calls = tuple(calls_in_text(content)) if role == "assistant" else ()
    return Message(role, strip_calls(content), calls) if calls else Message(role, content)


def _render(
    tokenizer: Any,
    messages: tuple[Message, ...],
    template: str,
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
) -> str:
    conversation = openai_messages(messages)
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja errors: templates raise on roles or orders they do not accept
        raise DataError(
            f"The chat template failed to render a conversation: {type(e).__name__}: {e}. Check the "
            "conversation's roles, or use another chat template."
        ) from e
    if not isinstance(text, str):
        raise DataError("The chat template did not render text. Use a template that returns a string.")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pack_samples(samples: list[Sample], block_size: int) -> list[PackedSample]:
    """Greedy first-fit packing of whole samples into blocks of at most block_size tokens."""
    if block_size < 1:
        raise DataError(f"block_size must be at least 1, got {block_size}.")
    bins: list[list[Sample]] = []
    room: list[int] = []
    for i, sample in enumerate(samples, start=1):
        n = len(sample.input_ids)
        if n > block_size:
            raise DataError(
                f"Sample {i} has {n} tokens, more than the packing block size {block_size}. Set the block "
                "size to at least the cutoff length."
            )
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(sample)
                room[b] -= n
                break
        else:
            bins.append([sample])
            room.append(block_size - n)
    return [_pack(group) for group in bins]


def _pack(group: list[Sample]) -> PackedSample:
    packed = PackedSample(input_ids=[], labels=[], position_ids=[], seq_lens=[])
    for j, sample in enumerate(group):
        labels = list(sample.labels)
        if j > 0 and labels:
            # the loss shifts labels by one: this token would be predicted from the previous sample's end
            labels[0] = IGNORE_INDEX
        packed.input_ids += sample.input_ids
        packed.labels += labels
        packed.position_ids += list(range(len(sample.input_ids)))
        packed.seq_lens.append(len(sample.input_ids))
    return packed


def render_preview(tokenizer: Any, sample: Sample) -> list[tuple[str, bool]]:
    """Consecutive spans of decoded text, each flagged True where it is trained (label != -100)."""
    spans: list[tuple[str, bool]] = []
    start = 0
    flags = [label != IGNORE_INDEX for label in sample.labels]
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            text = tokenizer.decode(sample.input_ids[start:i], skip_special_tokens=False)
            spans.append((text, flags[start]))
            start = i
    return spans
