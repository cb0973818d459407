"""Chat with a base model and named adapters: load, switch, unload, stream, and compare with the base.

One base model in memory serves every adapter (peft's load_adapter / set_adapter); "base" answers run
with the adapters disabled. The UI runs this in a process of its own so that Unload frees the memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from studio.data.tokenize import render_prompt
from studio.model.loading import ResolvedModel, load_model, load_tokenizer, resolve_model

BASE = "base"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy: reproducible answers, the honest way to compare
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1

    def validate(self) -> list[str]:
        p = []
        if not 1 <= self.max_new_tokens <= 4096:
            p.append(f"max_new_tokens must be in 1..4096 (got {self.max_new_tokens}).")
        if not 0 <= self.temperature <= 5:
            p.append(f"temperature must be in 0..5 (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            p.append(f"top_p must be in (0, 1] (got {self.top_p}).")
        if self.top_k < 0:
            p.append(f"top_k must be 0 (off) or positive (got {self.top_k}).")
        if not 0.5 <= self.repetition_penalty <= 3:
            p.append(f"repetition_penalty must be in 0.5..3 (got {self.repetition_penalty}).")
        return p

    def generate_kwargs(self, prompt_length: int = 0) -> dict:
        """generate()'s arguments. The repetition penalty counts only the reply's own tokens: counted over
        the prompt too (transformers' default) it forbids echoing the question, and a tool call, which must
        repeat a function name and argument from the schemas and the question, was never made (measured:
        a tuned model's call, p=0.89 for its first token, lost to a plain answer at 1.1)."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens}
        if self.repetition_penalty != 1.0:
            from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

            penalty = RepetitionPenaltyLogitsProcessor(
                float(self.repetition_penalty), prompt_ignore_length=prompt_length
            )
            kwargs["logits_processor"] = LogitsProcessorList([penalty])
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def final_text(partials: Iterable[str]) -> str:
    """The whole reply from a stream of growing partial texts."""
    final = ""
    for partial in partials:
        final = partial
    return final.strip()


@dataclass
class ChatSession:
    """A base model with zero or more adapters loaded by name."""

    source: str = "bundled"
    dtype: str = "fp32"
    quant_mode: str = "none"
    resolved: ResolvedModel | None = field(default=None, init=False)
    _model: object = field(default=None, init=False, repr=False)
    _tokenizer: object = field(default=None, init=False, repr=False)
    adapters: dict[str, str] = field(default_factory=dict, init=False)
    active: str = field(default=BASE, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def load(self) -> None:
        from studio.core.config import QuantSpec

        self.resolved = resolve_model(self.source)
        # A 4-bit base unpacks its weights to the chosen compute type per matmul; 8-bit ignores it.
        quant = QuantSpec(mode=self.quant_mode, compute_dtype=self.dtype) if self.quant_mode != "none" else None
        self._tokenizer = load_tokenizer(self.resolved)
        self._model = load_model(self.resolved, dtype=self.dtype, quant=quant)
        self._model.eval()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def weights_in(self) -> str:
        """How the loaded base really holds its weights ('4bit', '8bit' or its dtype), read from the model."""
        if getattr(self._model, "is_loaded_in_4bit", False):
            return "4bit"
        if getattr(self._model, "is_loaded_in_8bit", False):
            return "8bit"
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Load an adapter under a name and make it active."""
        from peft import PeftModel

        if not self.loaded:
            self.load()
        if name == BASE:
            raise ValueError(f"'{BASE}' is reserved for the model without adapters.")
        with self._lock:
            if name in self.adapters:
                self._model.set_adapter(name)
            elif isinstance(self._model, PeftModel):
                self._model.load_adapter(str(adapter_dir), adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(adapter_dir), adapter_name=name)
            self._model.eval()
            self.adapters[name] = str(adapter_dir)
            self.use(name)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                return
            self._model.delete_adapter(name)
            del self.adapters[name]
            if self.active == name:
                self.active = BASE
            if not self.adapters:
                self._model = self._model.unload()

    def use(self, name: str) -> None:
        if name != BASE and name not in self.adapters:
            raise KeyError(f"No adapter named '{name}' is loaded. Loaded: {', '.join(self.adapters) or 'none'}.")
        if name != BASE:
            self._model.set_adapter(name)
        self.active = name

    def prompt_ids(self, messages: list[dict[str, str]], tools: str | None = None):
        import torch

        text = render_prompt(self._tokenizer, messages, tools)
        ids = self._tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(next(self._model.parameters()).device) if torch.is_tensor(ids) else ids

    def stream(
        self,
        messages: list[dict[str, str]],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        tools: str | None = None,
    ) -> Iterator[str]:
        """Yield the reply text as it grows, token by token. tools: JSON schemas (studio.data.tools)."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        if not self.loaded:
            self.load()
        with self._lock:
            name = adapter or self.active
            ids = self.prompt_ids(messages, tools)
            streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = dict(
                input_ids=ids,
                attention_mask=ids.new_ones(ids.shape),
                streamer=streamer,
                pad_token_id=self._tokenizer.pad_token_id,
                **settings.generate_kwargs(prompt_length=ids.shape[-1]),
            )
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    if name == BASE and self.adapters:
                        with self._model.disable_adapter():
                            self._model.generate(**kwargs)
                    else:
                        if name != BASE:
                            self._model.set_adapter(name)
                        self._model.generate(**kwargs)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(err)
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text = ""
            for piece in streamer:
                text += piece
                yield text
            thread.join()
            if errors:
                raise errors[0]

    def reply(
        self,
        messages: list[dict[str, str]],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        tools: str | None = None,
    ) -> str:
        return final_text(self.stream(messages, settings, adapter, tools))

    def compare(
        self,
        messages: list[dict[str, str]],
        adapter: str,
        settings: GenerationSettings | None = None,
        tools: str | None = None,
    ) -> tuple[str, str]:
        """The same prompt answered without and with the adapter."""
        return self.reply(messages, settings, BASE, tools), self.reply(messages, settings, adapter, tools)
