"""Evaluate a finished run: loss and perplexity with and without its adapter, and greedy answers to
held-out prompts scored against the references (exact match, chrF, ROUGE-L), base and adapter side by side.

Nothing here imports gradio. `studio eval RUN` (`python -m studio.cli eval RUN`) is the headless face;
the web page runs that same command in a child process (`eval_process`), so the server never holds a model.

Scales as the packages give them: exact_match is a share (0-1), chrf is sacrebleu's corpus chrF (0-100),
rouge_l is rouge-score's mean ROUGE-L F1 (0-1). Every evaluation is written to
RUN_DIR/eval/<UTC timestamp>.json and RUN_DIR/eval/latest.json (schema: `EvalReport.to_dict`).
"""

from __future__ import annotations

import json
import math
import queue
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio.core import procs
from studio.core.config import ConfigError, RunConfig
from studio.core.errors import StudioError
from studio.core.fsutil import atomic_write
from studio.core.store import Run, RunNotFound, RunStatus, Store
from studio.core.workspace import RunDir, db_path
from studio.data import DataError, Example, Sample
from studio.data.tokenize import CHATML_TEMPLATE, IGNORE_INDEX, build_sample

VALIDATION = "validation split"  # the report's `dataset` when the run's own held-out rows were scored
PROGRESS_PREFIX = "[eval] "  # marks progress lines on the child's stderr among library warnings
EVAL_TIMEOUT_S = 3600
MAX_BATCH = 8
# Logits are rows x length x vocab floats: a 150k vocabulary at 2k tokens is 1.2 GB per row, so batches
# are sized to stay under this many floats (512 MiB in fp32) rather than to a fixed row count.
LOGITS_BUDGET = 2**27
# Sentence-final punctuation dropped before exact match: "Paris." and "paris" are the same answer.
_TRAILING = ".!?,;:…。！？，；：、 \t\n"
# CJK scripts are written without spaces: each character counts as a word for ROUGE-L.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORDS = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


class EvalError(StudioError, ValueError):
    """An evaluation that cannot run as asked; the message says how to fix it."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class EvalSpec:
    run_id: str = field(metadata=_help("A completed run with a final adapter."))
    dataset: str | None = field(
        default=None, metadata=_help("A registered dataset name; None (or 'validation split'): the run's own split.")
    )
    max_samples: int = field(default=32, metadata=_help("Samples scored for loss and perplexity."))
    gen_samples: int = field(default=8, metadata=_help("Prompts answered by base and adapter for the text metrics."))
    max_new_tokens: int = field(default=64, metadata=_help("Longest generated answer, in tokens (greedy)."))

    def __post_init__(self) -> None:
        if self.dataset is not None and self.dataset.strip() in ("", VALIDATION):
            self.dataset = None
        problems = self.validate()
        if problems:
            raise EvalError(" ".join(problems))

    def validate(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.run_id, str) or not self.run_id.strip():
            p.append("Pick a run to evaluate (a completed run's id).")
        for name, low, high in (("max_samples", 1, 100_000), ("gen_samples", 1, 10_000), ("max_new_tokens", 1, 4096)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                p.append(f"{name} must be a whole number in {low}..{high} (got {value!r}).")
        return p


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Pair:
    base: float
    adapter: float


@dataclass
class Scores:
    exact_match: float  # share of answers equal to the reference after normalize_answer (0-1)
    chrf: float  # sacrebleu corpus chrF (0-100)
    rouge_l: float  # mean ROUGE-L F1 (0-1)


@dataclass
class Generation:
    prompts: int
    max_new_tokens: int
    base: Scores
    adapter: Scores


@dataclass
class PreferenceScores:
    """On held-out pairs, the model's own ranking: the share of pairs whose chosen answer it finds more
    likely than the rejected one (summed log-probability of the answer tokens), and the mean difference."""

    pairs: int
    accuracy: Pair  # 0-1
    margin: Pair  # nats: mean of log p(chosen) - log p(rejected)


@dataclass
class EvalExample:
    prompt: str
    reference: str
    base: str
    adapter: str


@dataclass
class EvalReport:
    run_id: str
    dataset: str  # VALIDATION or a registered dataset's name
    samples: int  # samples scored for loss
    created_at: float  # unix time
    loss: Pair  # token-weighted mean cross-entropy over the answer tokens
    perplexity: Pair  # exp(loss)
    generation: Generation
    examples: list[EvalExample]
    preference: PreferenceScores | None = None  # runs on preference data (stage dpo, orpo; pairs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # field order and nesting are the file schema

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        try:
            gen = data["generation"]
            return cls(
                run_id=str(data["run_id"]),
                dataset=str(data["dataset"]),
                samples=int(data["samples"]),
                created_at=float(data["created_at"]),
                loss=Pair(**data["loss"]),
                perplexity=Pair(**data["perplexity"]),
                generation=Generation(
                    prompts=int(gen["prompts"]),
                    max_new_tokens=int(gen["max_new_tokens"]),
                    base=Scores(**gen["base"]),
                    adapter=Scores(**gen["adapter"]),
                ),
                examples=[EvalExample(**e) for e in data["examples"]],
                preference=_preference_from_dict(data.get("preference")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise EvalError(f"Not an evaluation report ({type(err).__name__}: {err}). Evaluate the run again.") from err


def _preference_from_dict(data: dict[str, Any] | None) -> PreferenceScores | None:
    if not data:
        return None
    return PreferenceScores(int(data["pairs"]), Pair(**data["accuracy"]), Pair(**data["margin"]))


def write_report(report: EvalReport, run_dir: str | Path) -> Path:
    """RUN_DIR/eval/<UTC timestamp>.json, then latest.json; returns the timestamped file."""
    run_folder = RunDir(run_dir)
    folder = run_folder.eval
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report.created_at))
    path, n = folder / f"{stamp}.json", 2
    while path.exists():  # two evaluations in one second keep both
        path, n = folder / f"{stamp}-{n}.json", n + 1
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    atomic_write(path, text)  # readers see the old file or the new one, never half of one
    atomic_write(run_folder.eval_latest, text)
    return path


def load_latest(run_dir: str | Path) -> EvalReport | None:
    """The run's latest evaluation, or None when it was never evaluated."""
    path = RunDir(run_dir).eval_latest
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalError(f"{path} is damaged ({err}). Evaluate the run again to replace it.") from err
    return EvalReport.from_dict(data)


def _change(base: float, adapter: float) -> float:
    return round(adapter - base, 4)


def summary_table(report: EvalReport) -> list[dict[str, Any]]:
    """Rows of (metric, base, adapter, change = adapter - base) for the CLI and the page."""
    g = report.generation
    pairs = [
        ("loss", report.loss.base, report.loss.adapter),
        ("perplexity", report.perplexity.base, report.perplexity.adapter),
        ("exact match (0-1)", g.base.exact_match, g.adapter.exact_match),
        ("chrF (0-100)", g.base.chrf, g.adapter.chrf),
        ("ROUGE-L F1 (0-1)", g.base.rouge_l, g.adapter.rouge_l),
    ]
    if report.preference is not None:
        pref = report.preference
        pairs += [
            ("preference accuracy (0-1)", pref.accuracy.base, pref.accuracy.adapter),
            ("preference margin (nats)", pref.margin.base, pref.margin.adapter),
        ]
    return [
        {"metric": name, "base": round(b, 4), "adapter": round(a, 4), "change": _change(b, a)} for name, b, a in pairs
    ]


# -- metrics (pure) -----------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, trailing sentence punctuation dropped."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (sacrebleu, character 6-grams, beta 2): 0-100."""
    from sacrebleu.metrics import CHRF

    _same_length(predictions, references)
    if not predictions:
        return 0.0
    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def words(text: str) -> list[str]:
    """rouge-score's own tokenizer keeps [a-z0-9] only, so every Cyrillic, Greek or CJK answer would
    score 0; this one keeps any script's letters (each CJK character a word) and agrees on ASCII."""
    return _WORDS.findall(text.lower())


class _WordTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return words(text)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score): 0-1."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> Scores:
    return Scores(
        exact_match=exact_match(predictions, references),
        chrf=chrf(predictions, references),
        rouge_l=rouge_l(predictions, references),
    )


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")


# -- choosing what to score (pure) --------------------------------------------------------------


def spread(n: int, k: int) -> list[int]:
    """k indices evenly spread over range(n) (all of them when k >= n): a sample that covers the whole
    file, not its first rows, which are often one topic."""
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


@dataclass(frozen=True)
class GenCase:
    """One held-out prompt: a chat conversation up to its last answer, or (plain text) a text's first half."""

    conversation: tuple[tuple[str, str], ...] | None  # (role, content) pairs, rendered with the chat template
    raw: str | None  # plain-text prompt, tokenized as is
    shown: str  # the prompt as the report shows it
    reference: str


def generation_case(example: Example) -> GenCase | None:
    """The prompt and reference answer in an example; None when it has none."""
    if example.messages:
        last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=None)
        if last is None:
            return None
        before = example.messages[:last]
        pairs = tuple((m.role, m.content) for m in before)
        asked = [m for m in before if m.role != "system"]
        shown = asked[0].content if len(asked) == 1 else "\n".join(f"{m.role}: {m.content}" for m in before)
        return GenCase(pairs, None, shown, example.messages[last].content)
    tokens = (example.text or "").split()
    if len(tokens) < 2:
        return None
    half = len(tokens) // 2  # a plain text has no answer: its second half is the continuation to predict
    prompt = " ".join(tokens[:half])
    return GenCase(None, prompt, prompt, " ".join(tokens[half:]))


def loss_batches(lengths: Sequence[int], vocab: int, max_rows: int = MAX_BATCH, budget: int = LOGITS_BUDGET):
    """Sample indices grouped into batches: by length (little padding), each within the logits budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        rows = len(current) + 1
        if current and (rows > max_rows or rows * lengths[i] * vocab > budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def until_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to (not including) the first stop token."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return list(ids[:i])
    return list(ids)


def stop_token_ids(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """The model's own end tokens (some have several, e.g. end-of-turn and end-of-text) plus the tokenizer's."""
    ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    out = [i for i in ids if i is not None]
    if tokenizer_eos is not None and tokenizer_eos not in out:
        out.append(tokenizer_eos)
    return out


# -- the run and its data -----------------------------------------------------------------------


@dataclass
class Target:
    """A run checked for evaluation: its store row, config and adapter."""

    run: Run
    config: RunConfig
    adapter_dir: Path
    dataset: str  # VALIDATION or the registered dataset's name


def _run_config(run: Run) -> RunConfig:
    path = RunDir.of(run).config
    try:
        return RunConfig.load(path) if path.is_file() else RunConfig.from_dict(run.config)
    except ConfigError as err:
        raise EvalError(f"Run {run.id}'s config cannot be read: {'; '.join(map(str, err.problems))}") from err


def check_spec(spec: EvalSpec, home: Path) -> Target:
    """Everything that can be wrong before a model loads: the run, its adapter, the data asked for."""
    home = Path(home)
    try:
        run = Store(db_path(home)).get_run(spec.run_id)
    except RunNotFound as err:
        raise EvalError(str(err)) from err
    if run.status != RunStatus.COMPLETED:
        raise EvalError(
            f"Run {run.id} is {run.status.value}: evaluation needs a completed run with a final adapter. "
            + ("Wait for it to finish." if not run.status.finished else "Resume it (studio resume) to finish it.")
        )
    adapter_dir = RunDir.of(run).adapter
    if not RunDir.is_adapter(adapter_dir):
        raise EvalError(
            f"Run {run.id} has no adapter at {adapter_dir} (adapter_config.json + adapter_model.safetensors): "
            "its files were moved or deleted. Train it again."
        )
    config = _run_config(run)
    if spec.dataset is None:
        if config.data.val_size <= 0:
            raise EvalError(
                f"Run {run.id} trained without a validation split (data.val_size is 0): pick a registered "
                "dataset to evaluate on (--dataset NAME), or train with data.val_size > 0 (e.g. 0.1)."
            )
        return Target(run, config, adapter_dir, VALIDATION)
    from studio.data import DatasetRegistry

    registry = DatasetRegistry(home)
    try:
        registry.get(spec.dataset)
    except DataError as err:
        known = ", ".join(e.name for e in registry.list()) or "none"
        raise EvalError(
            f"There is no registered dataset '{spec.dataset}'. Registered: {known}. Pick one of them, or "
            "register it first (studio datasets add)."
        ) from err
    return Target(run, config, adapter_dir, spec.dataset)


@dataclass
class EvalData:
    loss_samples: list[Sample]
    cases: list[GenCase]
    note: str | None = None  # a caveat the user should see (scoring rows the run trained on)
    pairs: list[Any] = field(default_factory=list)  # held-out preference pairs, ranked by base and adapter


def preference_items(target: Target, home: Path) -> list[Any] | None:
    """The pairs or labelled answers to score when the data is preference data (the run's held-out rows,
    split as training split them, or a registered preference dataset); None for instruction data."""
    from studio.data import DatasetRegistry
    from studio.data.preference import PREFERENCE_FORMATS
    from studio.training.stages import get_stage
    from studio.training.stages.preference import split_items

    config = target.config
    if target.dataset != VALIDATION:
        registry = DatasetRegistry(home)
        if registry.get(target.dataset).format not in PREFERENCE_FORMATS:
            return None
        return registry.load_preference(target.dataset)
    if config.stage == "sft":
        return None
    return split_items(config, home, get_stage(config.stage).data_kind)[1]  # the rows the run held out


def preference_data(items: list[Any], target: Target, spec: EvalSpec, tokenizer, note: str | None) -> EvalData:
    """Preference rows scored like instruction data on their good answers (loss, generations against the
    chosen answer as reference), and their pairs ranked by base and adapter."""
    from studio.data import Message
    from studio.data.preference import PreferencePair

    config = target.config
    good = [
        Example(messages=(*i.prompt, Message("assistant", i.chosen if isinstance(i, PreferencePair) else i.completion)))
        for i in items
        if isinstance(i, PreferencePair) or i.desirable
    ]
    picked = (good[i] for i in spread(len(good), spec.max_samples))
    built = (build_sample(tokenizer, ex, config.data.cutoff_len) for ex in picked)
    loss_samples = [s for s in built if s.trained_tokens]
    cases = [c for c in (generation_case(good[i]) for i in spread(len(good), spec.gen_samples)) if c]
    if not loss_samples or not cases:
        raise EvalError(f"No pair of {target.dataset} has a good answer left within cutoff_len to score.")
    pairs = [i for i in items if isinstance(i, PreferencePair)][: spec.max_samples]
    return EvalData(loss_samples, cases, note, pairs)


def select_data(target: Target, spec: EvalSpec, tokenizer, home: Path) -> EvalData:
    """The samples scored for loss and the prompts answered, tokenized exactly as the run tokenized."""
    config = target.config
    trained_on = target.dataset != VALIDATION and target.dataset in config.data.datasets
    note = (
        f"'{target.dataset}' is one of the run's training datasets: these scores include rows it trained on."
        if trained_on
        else None
    )
    try:
        items = preference_items(target, home)
    except DataError as err:
        raise EvalError(f"The preference rows of {target.dataset} cannot be read: {err}") from err
    if items is not None:
        return preference_data(items, target, spec, tokenizer, note)
    if target.dataset == VALIDATION:
        from studio.training.stages.sft import TrainingError, split_data

        try:
            split = split_data(config, tokenizer, home)
        except (DataError, TrainingError) as err:
            raise EvalError(f"The run's validation split cannot be rebuilt: {err}") from err
        examples, samples = split.eval_examples, split.eval_samples
        loss_samples = [samples[i] for i in spread(len(samples), spec.max_samples)]
        note = None
    else:
        from studio.data import DatasetRegistry

        examples = DatasetRegistry(home).load_examples(target.dataset)
        picked = (examples[i] for i in spread(len(examples), spec.max_samples))
        built = (build_sample(tokenizer, ex, config.data.cutoff_len, config.data.train_on_prompt) for ex in picked)
        loss_samples = [s for s in built if s.trained_tokens]  # an answer cut off entirely has nothing to score
    if not loss_samples:
        raise EvalError(
            f"No sample of {target.dataset} has an answer token left within cutoff_len "
            f"({config.data.cutoff_len}): nothing to score."
        )
    cases = [c for c in (generation_case(examples[i]) for i in spread(len(examples), spec.gen_samples)) if c]
    if not cases:
        raise EvalError(f"No example of {target.dataset} splits into a prompt and a reference answer.")
    return EvalData(loss_samples, cases, note)


# -- the model ----------------------------------------------------------------------------------


def eval_device(config: RunConfig) -> tuple[str, str]:
    """(device, dtype): CUDA in the run's compute type when the run could use it, else CPU in fp32.
    Always a full-precision base, also for QLoRA runs (as export merges them): no 4-bit CPU kernels."""
    import torch

    if config.train.device in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda", config.train.compute_type
    return "cpu", "fp32"


def load_tokenizer_for(target: Target):
    from studio.model.loading import load_tokenizer, resolve_model
    from studio.reports.export import adapter_base_source

    source, trust = adapter_base_source(target.adapter_dir)
    return load_tokenizer(resolve_model(source), trust)


def load_model_for(target: Target):
    """(base with the adapter, device). The same object answers as the base under `disable_adapter()`."""
    from peft import PeftModel

    from studio.model.loading import load_model, resolve_model
    from studio.reports.export import adapter_base_source

    source, trust = adapter_base_source(target.adapter_dir)
    device, dtype = eval_device(target.config)
    base = load_model(resolve_model(source), dtype=dtype, device=device, trust_remote_code=trust)
    try:
        model = PeftModel.from_pretrained(base, str(target.adapter_dir))
    except RuntimeError as err:  # size mismatches: the adapter belongs to another base
        raise EvalError(f"The adapter of run {target.run.id} does not fit its base model '{source}': {err}") from err
    model.eval()
    return model, device


def _pad_right(rows: Sequence[Sequence[int]], value: int, width: int) -> list[list[int]]:
    return [list(r) + [value] * (width - len(r)) for r in rows]


def summed_loss(model, samples: Sequence[Sample], pad_id: int, device: str) -> tuple[float, int]:
    """Sum of per-token cross-entropy over the trained tokens (labels != -100) of a batch, and their count.
    Computed here, not by the model, so padding and masking are exact and batches weigh by tokens."""
    import torch
    import torch.nn.functional as F

    width = max(len(s.input_ids) for s in samples)
    ids = torch.tensor(_pad_right([s.input_ids for s in samples], pad_id, width), device=device)
    labels = torch.tensor(_pad_right([s.labels for s in samples], IGNORE_INDEX, width), device=device)
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples], device=device)
    targets = labels[:, 1:]  # token t is predicted from the positions before it
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        total = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return float(total), int((targets != IGNORE_INDEX).sum())


def row_logprobs(model, samples: Sequence[Sample], pad_id: int, device: str) -> list[float]:
    """Each sample's summed log-probability of its trained (answer) tokens."""
    import torch
    import torch.nn.functional as F

    width = max(len(s.input_ids) for s in samples)
    ids = torch.tensor(_pad_right([s.input_ids for s in samples], pad_id, width), device=device)
    labels = torch.tensor(_pad_right([s.labels for s in samples], IGNORE_INDEX, width), device=device)
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        losses = F.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
        )  # (rows, positions), 0 where ignored
    return [-float(row.sum()) for row in losses]


def preference_scores(model, tokenizer, pairs: Sequence[Any], cutoff: int, device: str) -> PreferenceScores:
    """Base (adapter off) and adapter ranking of each pair: log p(chosen) against log p(rejected)."""
    from studio.data import Message

    def samples(side: str) -> list[Sample]:
        return [
            build_sample(tokenizer, Example(messages=(*p.prompt, Message("assistant", getattr(p, side)))), cutoff)
            for p in pairs
        ]

    chosen, rejected = samples("chosen"), samples("rejected")

    def ranked() -> tuple[float, float]:
        margins: list[float] = []
        for start in range(0, len(pairs), 4):  # 4 pairs (8 rows) a forward: bounded logits memory
            c = row_logprobs(model, chosen[start : start + 4], tokenizer.pad_token_id, device)
            r = row_logprobs(model, rejected[start : start + 4], tokenizer.pad_token_id, device)
            margins += [a - b for a, b in zip(c, r, strict=True)]
        return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)

    adapter = ranked()
    with model.disable_adapter():
        base = ranked()
    return PreferenceScores(len(pairs), Pair(base[0], adapter[0]), Pair(base[1], adapter[1]))


def mean_losses(model, samples: Sequence[Sample], pad_id: int, device: str) -> Pair:
    """Token-weighted mean loss without and with the adapter, batch by batch on the same inputs."""
    import torch

    vocab = model.get_output_embeddings().weight.shape[0]
    sums = {"base": 0.0, "adapter": 0.0}
    count = 0
    with torch.inference_mode():
        for batch in loss_batches([len(s.input_ids) for s in samples], vocab):
            rows = [samples[i] for i in batch]
            adapter_sum, n = summed_loss(model, rows, pad_id, device)
            with model.disable_adapter():
                base_sum, _ = summed_loss(model, rows, pad_id, device)
            sums["adapter"] += adapter_sum
            sums["base"] += base_sum
            count += n
    if count == 0:  # only a first-position label: nothing is predicted from a prompt
        raise EvalError("The samples have no answer token after the first position: nothing to score.")
    return Pair(base=sums["base"] / count, adapter=sums["adapter"] / count)


def prompt_ids(tokenizer, case: GenCase, limit: int) -> list[int]:
    """The prompt as the run's tokenization renders it: chat template + generation prompt; at most the
    last `limit` tokens (the end holds the question and the generation prompt)."""
    if case.conversation is not None:
        template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
        messages = [{"role": role, "content": content} for role, content in case.conversation]
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    else:
        text = case.raw or ""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-limit:]


def generate_ids(
    model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, device: str, use_adapter: bool
) -> list[list[int]]:
    """Greedy answers' token ids (up to the first stop token), a batch of prompts at a time, left-padded so
    every answer starts at the same column."""
    import torch

    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
    answers: list[list[int]] = []
    for start in range(0, len(prompts), MAX_BATCH):
        chunk = prompts[start : start + MAX_BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=pad_id,
        )
        with torch.inference_mode():
            if use_adapter:
                out = model.generate(**kwargs)
            else:
                with model.disable_adapter():
                    out = model.generate(**kwargs)
        answers += [until_stop(row, stops) for row in out[:, width:].tolist()]
    return answers


def generate_answers(
    model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, device: str, use_adapter: bool
) -> list[str]:
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, device, use_adapter)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


# -- the whole evaluation -----------------------------------------------------------------------


def evaluate_run(spec: EvalSpec, home: Path, progress: Callable[[str], None] | None = None) -> EvalReport:
    """Score a finished run with and without its adapter; write and return the report."""
    say = progress or (lambda _message: None)
    home = Path(home)
    target = check_spec(spec, home)
    tokenizer = load_tokenizer_for(target)
    data = select_data(target, spec, tokenizer, home)  # data problems surface before minutes of loading
    if data.note:
        say(f"Note: {data.note}")
    say(f"Loading run {target.run.id}: base model and adapter")
    model, device = load_model_for(target)
    tokens = sum(s.trained_tokens for s in data.loss_samples)
    say(f"Loss on {len(data.loss_samples)} samples of {target.dataset} ({tokens} answer tokens), base and adapter")
    loss = mean_losses(model, data.loss_samples, tokenizer.pad_token_id, device)
    limit = max(8, target.config.data.cutoff_len)
    prompts = [prompt_ids(tokenizer, case, limit) for case in data.cases]
    say(f"Generating {len(prompts)} answers with the base (greedy, up to {spec.max_new_tokens} new tokens)")
    base_out = generate_answers(model, tokenizer, prompts, spec.max_new_tokens, device, use_adapter=False)
    say(f"Generating {len(prompts)} answers with the adapter")
    tuned_out = generate_answers(model, tokenizer, prompts, spec.max_new_tokens, device, use_adapter=True)
    references = [case.reference for case in data.cases]
    preference = None
    if data.pairs:
        say(f"Ranking {len(data.pairs)} held-out pairs (chosen vs rejected), base and adapter")
        preference = preference_scores(model, tokenizer, data.pairs, target.config.data.cutoff_len, device)
    report = EvalReport(
        run_id=target.run.id,
        dataset=target.dataset,
        samples=len(data.loss_samples),
        created_at=time.time(),
        loss=loss,
        perplexity=Pair(perplexity(loss.base), perplexity(loss.adapter)),
        generation=Generation(
            prompts=len(prompts),
            max_new_tokens=spec.max_new_tokens,
            base=text_scores(base_out, references),
            adapter=text_scores(tuned_out, references),
        ),
        examples=[
            EvalExample(case.shown, case.reference, b, a)
            for case, b, a in zip(data.cases, base_out, tuned_out, strict=True)
        ],
        preference=preference,
    )
    path = write_report(report, target.run.run_dir)
    say(f"Report saved to {path}")
    _refresh_card(home, spec.run_id, say)
    return report


def _refresh_card(home: Path, run_id: str, say: Callable[[str], None]) -> None:
    """The run card next to the adapter gains its Evaluation section; a card that cannot be written
    never fails an evaluation that succeeded."""
    from studio.reports.card import write_card

    try:
        say(f"Run card updated: {write_card(home, run_id)}")
    except Exception as err:  # noqa: BLE001 - the report is saved; the card is a convenience
        say(f"Run card not updated ({err}); `studio card {run_id}` writes it.")


# -- in a child process (the web page's way) -----------------------------------------------------


@dataclass
class ChildEval:
    """How an evaluation in a child process ended."""

    pid: int
    returncode: int | None  # None: stopped by us (time limit)
    report: EvalReport | None
    error: str | None


def child_command(spec: EvalSpec) -> list[str]:
    cmd = [sys.executable, "-m", "studio.cli", "eval", spec.run_id, "--json"]
    cmd += ["--samples", str(spec.max_samples), "--gen-samples", str(spec.gen_samples)]
    cmd += ["--max-new-tokens", str(spec.max_new_tokens)]
    if spec.dataset is not None:
        cmd += ["--dataset", spec.dataset]
    return cmd


def child_outcome(pid: int, code: int, stdout: str, stderr_tail: Sequence[str]) -> ChildEval:
    """The report from a finished child's stdout, or the reason it failed from its stderr."""
    if code == 0:
        try:
            return ChildEval(pid, code, EvalReport.from_dict(json.loads(stdout)), None)
        except (ValueError, EvalError) as err:
            return ChildEval(pid, code, None, f"The evaluation printed no readable report ({err}).")
    said = [line.removeprefix("error: ") for line in stderr_tail if line.startswith("error: ")]
    if said:
        return ChildEval(pid, code, None, said[-1])

    last = next((line for line in reversed(stderr_tail) if line.strip()), "no message")
    return ChildEval(pid, code, None, f"The evaluation process ended with {procs.exit_description(code)}: {last}")


def eval_process(spec: EvalSpec, home: Path, timeout_s: float = EVAL_TIMEOUT_S) -> Iterator[str | ChildEval]:
    """Run the evaluation as `python -m studio.cli eval ... --json` in a child process: yields its
    progress messages, then one ChildEval. The child is ended and reaped however this stops: done,
    past the time limit, or closed early by the caller (a page closed mid-evaluation)."""
    env = procs.python_env(home, TOKENIZERS_PARALLELISM="false")
    # stdout to a file, not a pipe: a long report would fill a pipe nobody reads while stderr is followed.
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
        popen = procs.spawn(child_command(spec), env, stdout=out, stderr=subprocess.PIPE)
        try:
            lines = procs.read_lines(popen.stderr)
            tail: deque[str] = deque(maxlen=50)
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    procs.end(popen)
                    minutes = f"{timeout_s / 60:.0f} minutes" if timeout_s >= 120 else f"{timeout_s:g} s"
                    message = f"The evaluation took longer than {minutes} and was stopped. Evaluate fewer samples."
                    yield ChildEval(popen.pid, None, None, message)
                    return
                try:
                    line = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if line is None:  # stderr closed: the child is exiting
                    break
                tail.append(line)
                if line.startswith(PROGRESS_PREFIX):
                    yield line.removeprefix(PROGRESS_PREFIX)
            try:
                code = popen.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                procs.end(popen)
                yield ChildEval(popen.pid, None, None, "The evaluation process closed its output but did not exit.")
                return
            out.seek(0)
            yield child_outcome(popen.pid, code, out.read(), list(tail))
        finally:
            procs.end(popen)


def evaluate_in_child(spec: EvalSpec, home: Path, timeout_s: float = EVAL_TIMEOUT_S) -> ChildEval:
    """eval_process without the progress: blocks until the child is done and gone."""
    outcome: ChildEval | None = None
    for item in eval_process(spec, home, timeout_s):
        if isinstance(item, ChildEval):
            outcome = item
    assert outcome is not None  # eval_process always ends with one
    return outcome
