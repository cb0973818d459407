"""Tokenization with the real bundled tokenizer (fixture `tokenizer` from tests/conftest.py): exactly the
answers + EOS are trained; packing keeps samples apart."""

from __future__ import annotations

import pytest

from studio.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Message,
    Sample,
    build_sample,
    pack_samples,
    render_preview,
)

EOS = "<|im_end|>"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(*turns: str, system: str | None = None) -> Example:
    messages = [Message("system", system)] if system else []
    messages += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return Example(messages=tuple(messages))


def supervised(tokenizer, sample: Sample) -> str:
    ids = [i for i, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def trained_spans(tokenizer, sample: Sample) -> list[str]:
    return [text for text, trained in render_preview(tokenizer, sample) if trained]


def test_single_turn_trains_exactly_the_answer_and_eos(tokenizer):
    sample = build_sample(tokenizer, chat("Who is Ripple?", "A purple otter."), cutoff_len=512)
    assert supervised(tokenizer, sample) == "A purple otter." + EOS
    assert [label for label in sample.labels if label != IGNORE_INDEX] == [
        i for i, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert sample.input_ids[-2] == tokenizer.convert_tokens_to_ids(EOS)  # then the template's "\n"
    assert sample.labels[-1] == IGNORE_INDEX
    assert not sample.truncated
    assert sample.full_length == len(sample.input_ids)


def test_multi_turn_with_system_trains_each_answer(tokenizer):
    example = chat("Capital of Veloria?", "Port Amsel.", "Currency?", "The tidemark.", system="Be brief.")
    sample = build_sample(tokenizer, example, cutoff_len=512)
    assert supervised(tokenizer, sample) == "Port Amsel." + EOS + "The tidemark." + EOS
    assert trained_spans(tokenizer, sample) == ["Port Amsel." + EOS, "The tidemark." + EOS]
    preview = render_preview(tokenizer, sample)
    assert preview[0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Veloria?<|im_end|>\n"
        "<|im_start|>assistant\n",
        False,
    )
    assert [trained for _, trained in preview] == [False, True, False, True, False]


def test_segments_tokenize_like_the_whole_rendered_text(tokenizer):
    example = chat("Hi there", "Hello! How can I help?", "Tell me a fact.", "Otters hold hands.")
    sample = build_sample(tokenizer, example, cutoff_len=512)
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    assert text.startswith(SMOL_SYSTEM)  # SmolLM's template adds its default system prompt
    assert sample.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_train_on_prompt_labels_everything(tokenizer):
    sample = build_sample(tokenizer, chat("q", "a", "q2", "a2"), cutoff_len=512, train_on_prompt=True)
    assert sample.labels == sample.input_ids


def test_plain_text_is_fully_supervised_and_ends_with_eos(tokenizer):
    sample = build_sample(tokenizer, Example(text="Ripple is an otter."), cutoff_len=512)
    assert sample.labels == sample.input_ids
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == "Ripple is an otter." + EOS


def test_truncation_keeps_the_beginning(tokenizer):
    example = chat("A fairly long question about Veloria and its islands?", "A long answer, too.")
    full = build_sample(tokenizer, example, cutoff_len=512)
    cut = build_sample(tokenizer, example, cutoff_len=10)
    assert (cut.truncated, cut.full_length, len(cut.input_ids)) == (True, full.full_length, 10)
    assert cut.input_ids == full.input_ids[:10]
    assert cut.labels == full.labels[:10]
    assert full.full_length > 10
    with pytest.raises(DataError, match="cutoff_len must be at least 1, got 0"):
        build_sample(tokenizer, example, cutoff_len=0)


def test_fallback_chatml_when_the_tokenizer_has_no_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    sample = build_sample(tokenizer, chat("q", "a"), cutoff_len=512)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    )
    assert supervised(tokenizer, sample) == "a" + EOS


def test_eos_is_appended_when_the_template_does_not_emit_it(tokenizer):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    sample = build_sample(tokenizer, chat("q", "a"), cutoff_len=512, chat_template=template)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == "user: q\nassistant: a" + EOS + "\n"
    assert supervised(tokenizer, sample) == "a" + EOS


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # drops earlier assistant answers, as some reasoning-model templates do
    template = (
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert supervised(tokenizer, build_sample(tokenizer, chat("q", "a"), 64, chat_template=template)) == "a" + EOS
    with pytest.raises(DataError, match="renders the conversation up to turn 4 differently"):
        build_sample(tokenizer, chat("q", "a", "q2", "a2"), 64, chat_template=template)


def test_template_whose_generation_prompt_is_not_a_prefix_is_refused(tokenizer):
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(DataError, match="does not start with its own generation prompt"):
        build_sample(tokenizer, chat("q", "a"), 64, chat_template=template)


# ---------------------------------------------------------------- packing


def fake(n: int, start: int) -> Sample:
    ids = list(range(start, start + n))
    return Sample(input_ids=ids, labels=list(ids), truncated=False, full_length=n)


def test_packing_first_fit_resets_positions_and_masks_boundaries():
    samples = [fake(5, 100), fake(4, 200), fake(3, 300), fake(2, 400)]
    packed = pack_samples(samples, block_size=8)
    assert [p.seq_lens for p in packed] == [[5, 3], [4, 2]]
    first = packed[0]
    assert first.input_ids == [100, 101, 102, 103, 104, 300, 301, 302]
    assert first.position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    # first label of the block kept; the first token of the next sample is not predicted across the boundary
    assert first.labels == [100, 101, 102, 103, 104, IGNORE_INDEX, 301, 302]
    assert packed[1].labels == [200, 201, 202, 203, IGNORE_INDEX, 401]
    assert packed[1].position_ids == [0, 1, 2, 3, 0, 1]


def test_packing_real_samples_keeps_every_token(tokenizer):
    samples = [build_sample(tokenizer, chat(f"q{i}", f"answer {i}"), 512) for i in range(4)]
    block = 2 * len(samples[0].input_ids) + 2
    packed = pack_samples(samples, block)
    assert sum(len(p.input_ids) for p in packed) == sum(len(s.input_ids) for s in samples)
    assert all(len(p.input_ids) <= block for p in packed)
    assert [len(p.seq_lens) for p in packed] == [2, 2]


def test_sample_longer_than_the_block_is_refused():
    with pytest.raises(DataError, match="Sample 2 has 9 tokens, more than the packing block size 8"):
        pack_samples([fake(3, 0), fake(9, 0)], 8)
