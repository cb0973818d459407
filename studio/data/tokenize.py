"""Examples -> token ids with a label mask, packing, and a preview of what is trained.

Only the answers (plus EOS) are supervised: a model trained on its prompts learns to write questions,
and one never shown EOS never stops (FIELD-NOTES: "model repeats itself / never stops").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.data.errors import DataError
from studio.data.formats import Example, Message

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
        for text, trained in chat_segments(tokenizer, example.messages, eos, chat_template):
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
    tokenizer: Any, messages: tuple[Message, ...], eos: str, chat_template: str | None = None
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, supervised) pieces.

    For assistant turn k: prompt_k = template(messages[:k], generation prompt), full_k =
    template(messages[:k+1]); full_k[len(prompt_k):] holds the answer. Supervised = the answer + EOS.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    segments: list[tuple[str, bool]] = []
    done = ""  # text already placed into segments
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], template, add_generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], template, add_generation_prompt=False)
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
        at = answer.find(message.content)
        if at < 0:
            raise DataError(
                f"The chat template changes the text of answer {k + 1} (it does not appear verbatim in the "
                "rendered turn), so it cannot be labelled. Use a template that copies the content as is."
            )
        before, rest = answer[:at], answer[at + len(message.content) :]
        after = rest[len(eos) :] if rest.startswith(eos) else rest  # EOS is added below, if missing
        segments.append((prompt[len(done) :] + before, False))
        segments.append((message.content + eos, True))
        if after:
            segments.append((after, False))
        done = full
    return [(text, trained) for text, trained in segments if text]


def _render(tokenizer: Any, messages: tuple[Message, ...], template: str, add_generation_prompt: bool) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
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
