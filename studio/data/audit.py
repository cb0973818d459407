"""The dataset doctor: find what quietly spoils a fine-tune, and fix what is safe to fix.

Checks (each a small pure function over the examples, plus token lengths where needed):
- exact / near duplicates: MinHash (one-permutation, densified) over character shingles with LSH banding,
  so 50k rows stay near-linear (~3 s); every candidate pair is verified with real Jaccard similarities: a
  near copy asks nearly the same and answers nearly the same (each >= NEAR_DUP_THRESHOLD).
- conflicting answers: the same prompt (system and history included) answered materially differently.
- length outliers: robust z-scores (median / MAD of log lengths): far too long rows, near-empty answers.
- language outliers: a row whose dominant Unicode script is not the dataset's (unicodedata names only).
- missing EOS: the last trained token after tokenization is not EOS (cut by cutoff_len, or the tokenizer
  never produces the EOS id), which teaches a model never to stop (FIELD-NOTES).
- leakage: near copies on both sides of the exact train/validation split training uses, and rows that
  nearly repeat an evaluation dataset.

Fixes never touch the examined dataset: apply_fixes registers a cleaned copy under a new name, so runs
that used the old name stay reproducible. Nothing here imports gradio.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import tempfile
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from studio.core.problems import Severity
from studio.data.clean import CleanOptions
from studio.data.errors import DataError
from studio.data.formats import Example, Message, openai_messages
from studio.data.preference import PreferencePair
from studio.data.registry import DatasetEntry, DatasetRegistry, validate_dataset_name
from studio.data.split import split_indices
from studio.data.tokenize import IGNORE_INDEX, Sample, build_sample

KINDS = (
    "exact_duplicate",
    "near_duplicate",
    "conflicting_answers",
    "length_outlier",
    "language_outlier",
    "missing_eos",
    "leakage",
    "length_bias",  # preference pairs whose chosen answer is nearly always the longer
)
SEVERITIES = (Severity.INFO, Severity.WARNING)
FIXES = ("drop", "dedupe")

NEAR_DUP_THRESHOLD = 0.8  # Jaccard of character shingles: above it, two rows say the same thing
SHINGLE_CHARS = 5  # character 5-grams: robust to typos and word order, and work for scripts without spaces
BANDS, BAND_ROWS = 20, 5  # 100 MinHash values; a pair at 0.8 becomes a candidate with p = 0.9996, at 0.5 p = 0.47
BUCKET_CAP = 50  # larger LSH buckets (templated rows) are checked against their first member only: stays linear
OUTLIER_Z = 3.5  # robust z-score beyond which a length is an outlier (Iglewicz & Hoaglin)
LOG_SCALE_FLOOR = 0.35  # least spread assumed, in log length: flags need >= ~3.4x (or <= 1/3.4) the median
NEAR_EMPTY_WORDS = 3  # a short answer is "near-empty" only if it is also this few words ("No.", "N/A")
MIN_ROWS_FOR_STATS = 8  # fewer rows say nothing about what is typical
SCRIPT_MAJORITY = 0.9  # a dataset is single-script when this share of its rows is in one script
ESTIMATE_MARGIN = 0.25  # pairs whose MinHash estimate is this far below the threshold are not verified exactly
LENGTH_BIAS_SHARE = 0.8  # above this share of longer chosen answers, DPO may learn "longer is better"
MIN_PAIRS_FOR_BIAS = 10  # fewer pairs say nothing about a bias
EXCERPT_CHARS = 60
FULL_LENGTH = 10**9  # cutoff used to tokenize a row whole; the real cutoff is applied afterwards

_PRIME = np.uint64(1_000_003)
_LOW32 = np.uint64(0xFFFFFFFF)
_SIG_CHUNK = 1 << 20  # shingles per block when computing signatures (a few arrays of 8 MB each)
_TEXT_CHUNK = 1 << 21  # characters per block when shingling
_NON_WORD = re.compile(r"[\W_]+")
# CJK ideographs and the Japanese kana go together: a Japanese row mixes them freely.
_SCRIPT_ALIASES = {"CJK": "CJK", "HIRAGANA": "CJK", "KATAKANA": "CJK", "FULLWIDTH": "LATIN", "HALFWIDTH": "CJK"}


@dataclass(frozen=True)
class DoctorFinding:
    kind: str  # one of KINDS
    severity: Severity  # INFO or WARNING
    rows: tuple[int, ...]  # 0-based indices into the examples as load_examples returns them
    detail: str  # what is wrong, in plain words, with a short excerpt
    fix: str | None  # "drop" | "dedupe" (keep the first row) | None when only a human can decide
    hint: str  # what the user should do

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DoctorFinding kind must be one of {KINDS}, got {self.kind!r}")
        if self.severity not in SEVERITIES:
            allowed = tuple(map(str, SEVERITIES))
            raise ValueError(f"DoctorFinding severity must be one of {allowed}, got {self.severity!r}")
        object.__setattr__(self, "severity", Severity(self.severity))
        if self.fix is not None and self.fix not in FIXES:
            raise ValueError(f"DoctorFinding fix must be one of {FIXES} or None, got {self.fix!r}")
        object.__setattr__(self, "rows", tuple(sorted(int(r) for r in self.rows)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DoctorFinding:
        return cls(
            kind=data["kind"],
            severity=data["severity"],
            rows=tuple(data.get("rows") or ()),
            detail=data.get("detail", ""),
            fix=data.get("fix"),
            hint=data.get("hint", ""),
        )


@dataclass
class DoctorReport:
    dataset: str
    rows: int
    findings: list[DoctorFinding]
    fingerprint: str = ""  # of the examined examples: fixes refuse a dataset that changed since
    settings: dict[str, Any] = field(default_factory=dict)  # cutoff_len, val_size, seed, ... as examined

    @property
    def warnings(self) -> list[DoctorFinding]:
        return [f for f in self.findings if f.severity == Severity.WARNING]

    @property
    def healthy(self) -> bool:
        return not self.warnings

    def summary(self) -> str:
        head = f"'{self.dataset}': {self.rows} rows"
        if not self.findings:
            return f"{head}, no problems found."
        counts = Counter(f.kind for f in self.findings)
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        notes = len(self.findings) - len(self.warnings)
        status = f"{len(self.warnings)} warning{'s' * (len(self.warnings) != 1)}, {notes} note{'s' * (notes != 1)}"
        removable = len(rows_to_remove(self.findings))
        fixes = f" Safe fixes would remove {removable} row{'s' * (removable != 1)}." if removable else ""
        return f"{head}; {status} ({kinds}).{fixes}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "rows": self.rows,
            "healthy": self.healthy,
            "summary": self.summary(),
            "fingerprint": self.fingerprint,
            "settings": dict(self.settings),
            "findings": [f.to_dict() for f in self.findings],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DoctorReport:
        try:
            return cls(
                dataset=data["dataset"],
                rows=int(data["rows"]),
                findings=[DoctorFinding.from_dict(f) for f in data.get("findings") or []],
                fingerprint=data.get("fingerprint", ""),
                settings=dict(data.get("settings") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"This is not a dataset doctor report ({e}). Examine the dataset again.") from e


@dataclass(frozen=True)
class FixResult:
    """What apply_fixes removed: 0-based rows of the examined dataset, and how many per finding kind."""

    source: str
    kept: int
    removed_rows: tuple[int, ...]
    removed_by_kind: dict[str, int]

    def summary(self) -> str:
        parts = ", ".join(f"{n} by {kind}" for kind, n in self.removed_by_kind.items()) or "none"
        total = self.kept + len(self.removed_rows)
        return f"removed {len(self.removed_rows)} of {total} rows of '{self.source}' ({parts})"


# ---------------------------------------------------------------- text helpers


def normalize(text: str) -> str:
    """Case, spacing and punctuation ignored: what two rows must share to say the same thing."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def answers(example: Example) -> list[str]:
    """What is trained on: the assistant answers, or the whole text."""
    if example.text is not None:
        return [example.text]
    return [m.shown for m in example.messages if m.role == "assistant"]


def first_words(example: Example) -> str:
    """The text a person recognises a row by: its last question, or the start of its text."""
    if example.text is not None:
        return example.text
    users = [m.content for m in example.messages if m.role == "user"]
    return users[-1] if users else ""


@lru_cache(maxsize=1 << 16)
def normalized(example: Example) -> tuple[tuple[str, str], ...]:
    """(role, normalised content) per message; a plain text is one ("text", ...) entry. Cached: every check
    reads the same rows, and normalising is the costliest step in pure Python."""
    if example.text is not None:
        return (("text", normalize(example.text)),)
    return tuple((m.role, normalize(m.shown)) for m in example.messages)


def full_key(example: Example) -> str:
    """Every message with its role, normalised: equal keys = the same example."""
    return "\n".join(f"{role}:{text}" for role, text in normalized(example))


def turns_text(example: Example) -> str:
    """The text compared for near copies. The system prompt is left out: one shared by every row would
    make all rows look alike."""
    return " | ".join(text for role, text in normalized(example) if role != "system")


def prompt_text(example: Example) -> str:
    """The turns before the final answer (history included, system left out), normalised."""
    return " | ".join(text for role, text in normalized(example)[:-1] if role != "system")


def answer_text(example: Example) -> str:
    """The final answer (or the whole plain text), normalised."""
    return normalized(example)[-1][1] if example.text is not None or example.messages else ""


def prompt_key(example: Example) -> str | None:
    """Everything before the final answer (system and history included), normalised; None for plain text."""
    if example.text is not None or not example.messages:
        return None
    return "\n".join(f"{role}:{text}" for role, text in normalized(example)[:-1])


def fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        row = ex.text if ex.text is not None else [[m.role, m.shown] for m in ex.messages]
        if ex.tools:
            row = [row, ex.tools]
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------- MinHash / LSH


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(texts: list[str], size: int = SHINGLE_CHARS) -> list[np.ndarray]:
    """Each text's character `size`-grams as 64-bit hashes, in text order (repeats kept; empty text: none).

    Deterministic (no salted hash()), so a report is the same every time. Texts are hashed in blocks."""
    out: list[np.ndarray] = []
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= _TEXT_CHUNK):
            chars += len(texts[end])
            end += 1
        out += _hash_block(texts[start:end], size)
        start = end
    return out


def shingle_sets(texts: list[str], size: int = SHINGLE_CHARS) -> list[np.ndarray]:
    """Each text's shingles as a sorted array of unique hashes: the sets Jaccard similarity compares."""
    return [np.unique(h) for h in shingle_hashes(texts, size)]


def _hash_block(texts: list[str], size: int) -> list[np.ndarray]:
    padded = [t.ljust(size, "\x01") if t else "" for t in texts]  # a short text is one shingle
    lengths = np.array([len(t) for t in padded], dtype=np.int64)
    joined = "".join(padded)
    if not joined:
        return [np.empty(0, dtype=np.uint64) for _ in texts]
    cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    n_pos = len(cps) - size + 1
    rolling = np.zeros(n_pos, dtype=np.uint64)
    for j in range(size):  # polynomial hash of every window of the joined text
        rolling = rolling * _PRIME + cps[j : j + n_pos]
    windows = np.where(lengths > 0, lengths - size + 1, 0)  # only the windows inside one text
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    offset = np.arange(int(windows.sum())) - np.repeat(np.cumsum(windows) - windows, windows)
    values = _mix(rolling[np.repeat(starts, windows) + offset])
    bounds = np.concatenate(([0], np.cumsum(windows)))
    return [values[bounds[i] : bounds[i + 1]] for i in range(len(texts))]


def minhash_signatures(hashes: list[np.ndarray], bins: int = BANDS * BAND_ROWS) -> np.ndarray:
    """(len(hashes), bins) MinHash signatures of non-empty hash lists, by one-permutation hashing (Li, Owen
    & Zhang 2012) densified by rotation (Shrivastava & Li 2014): a hash's high half picks its bin, each bin
    keeps its smallest low half, and an empty bin borrows from the next non-empty one to its right, offset
    by the distance. One pass over the shingles instead of one per permutation; two rows agree on a bin
    with probability ~ their Jaccard similarity, as with classic MinHash."""
    sig = np.empty((len(hashes), bins), dtype=np.uint64)
    start = 0
    while start < len(hashes):
        end, total = start, 0
        while end < len(hashes) and (end == start or total + len(hashes[end]) <= _SIG_CHUNK):
            total += len(hashes[end])
            end += 1
        sig[start:end] = _one_permutation(hashes[start:end], bins)
        start = end
    return sig


def _one_permutation(hashes: list[np.ndarray], bins: int) -> np.ndarray:
    n = len(hashes)
    flat = np.concatenate(hashes)
    row = np.repeat(np.arange(n), [len(h) for h in hashes])
    empty = np.iinfo(np.uint64).max
    sig = np.full(n * bins, empty, dtype=np.uint64)
    np.minimum.at(sig, row * bins + ((flat >> np.uint64(32)) % np.uint64(bins)).astype(np.int64), flat & _LOW32)
    sig = sig.reshape(n, bins)
    twice = np.concatenate([sig, sig], axis=1)  # circular: the right neighbour of the last bin is the first
    col = np.where(twice != empty, np.arange(2 * bins), 2 * bins)
    nearest = np.minimum.accumulate(col[:, ::-1], axis=1)[:, ::-1][:, :bins]  # first filled bin at or after j
    distance = (nearest - np.arange(bins)).astype(np.uint64)
    return np.take_along_axis(twice, nearest, axis=1) + (distance << np.uint64(32))


def lsh_candidates(sig: np.ndarray, bands: int = BANDS, rows: int = BAND_ROWS, cap: int = BUCKET_CAP) -> set:
    """Pairs (i < j) that agree on all `rows` values of at least one band."""
    n = len(sig)
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        key = np.zeros(n, dtype=np.uint64)
        for col in sig[:, band * rows : (band + 1) * rows].T:
            key = _mix(key * _PRIME + col)
        order = np.argsort(key, kind="stable")  # stable: members of a bucket stay in row order
        ordered = key[order]
        change = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
        starts = np.concatenate(([0], change))
        ends = np.concatenate((change, [n]))
        for s, e in zip(starts[ends - starts >= 2], ends[ends - starts >= 2], strict=True):
            members = order[s:e].tolist()
            if len(members) <= cap:
                pairs.update(combinations(members, 2))
            else:
                pairs.update((members[0], m) for m in members[1:])
    return pairs


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) or not len(b):
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (len(a) + len(b) - inter)


def candidate_pairs(hashes: list[np.ndarray], split: int | None = None) -> list[tuple[int, int]]:
    """Pairs (i < j) of non-empty rows that LSH proposes as similar, sorted; with `split`, only pairs across
    it (i < split <= j). Callers verify each with real Jaccard similarities."""
    live = [i for i, h in enumerate(hashes) if len(h)]
    if len(live) < 2:
        return []
    pairs = ((live[x], live[y]) for x, y in lsh_candidates(minhash_signatures([hashes[i] for i in live])))
    return sorted(p for p in pairs if split is None or p[0] < split <= p[1])


def similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Jaccard(a, b) >= threshold; two empty sets (no prompt on either side) count as the same."""
    if not len(a) and not len(b):
        return True
    small, big = sorted((len(a), len(b)))
    return small >= threshold * big and jaccard(a, b) >= threshold  # Jaccard <= small / big


def estimated_similarity(hashes: list[np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """The MinHash estimate of each pair's Jaccard (pairs: (m, 2) indices into `hashes`), vectorised. Two
    empty lists count as the same, one empty one as nothing shared."""
    filled = np.array([len(h) > 0 for h in hashes], dtype=bool)
    sig = np.zeros((len(hashes), BANDS * BAND_ROWS), dtype=np.uint64)
    live = np.flatnonzero(filled)
    if len(live):
        sig[live] = minhash_signatures([hashes[i] for i in live])
    est = np.empty(len(pairs))
    for s in range(0, len(pairs), 1 << 16):  # bounded memory: 65k pairs x 100 values at a time
        block = pairs[s : s + (1 << 16)]
        est[s : s + len(block)] = (sig[block[:, 0]] == sig[block[:, 1]]).mean(axis=1)
    first, second = filled[pairs[:, 0]], filled[pairs[:, 1]]
    est[~first & ~second] = 1.0
    est[first != second] = 0.0
    return est


def near_pairs(
    examples: list[Example], pairs: list[tuple[int, int]], threshold: float = NEAR_DUP_THRESHOLD
) -> list[tuple[int, int]]:
    """The candidate pairs that are near copies: they ask nearly the same and answer nearly the same.
    Paraphrased questions that share one answer (the way a fact is taught) are not, however long the answer.

    MinHash estimates of both similarities screen the pairs first, vectorised, so templated rows (many
    candidates, none near) cost little; the survivors are verified exactly."""
    if not pairs:
        return []
    needed = sorted({i for pair in pairs for i in pair})
    local = {row: k for k, row in enumerate(needed)}
    index = np.array([(local[i], local[j]) for i, j in pairs], dtype=np.int64)
    prompts = shingle_hashes([prompt_text(examples[i]) for i in needed])
    finals = shingle_hashes([answer_text(examples[i]) for i in needed])
    floor = threshold - ESTIMATE_MARGIN
    likely = (estimated_similarity(prompts, index) >= floor) & (estimated_similarity(finals, index) >= floor)
    sets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    found = []
    for k in np.flatnonzero(likely).tolist():
        a, b = index[k].tolist()
        for x in (a, b):
            if x not in sets:
                sets[x] = (np.unique(prompts[x]), np.unique(finals[x]))
        (pa, fa), (pb, fb) = sets[a], sets[b]
        if similar(pa, pb, threshold) and similar(fa, fb, threshold):
            found.append(pairs[k])
    return found


def components(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected groups (size >= 2) of a graph on range(n), each sorted, in order of their first member."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(root(x), []).append(x)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _set_of(text: str) -> np.ndarray:
    return shingle_sets([text])[0]


# ---------------------------------------------------------------- checks


def duplicate_groups(examples: list[Example], threshold: float = NEAR_DUP_THRESHOLD) -> list[list[int]]:
    """Groups of rows (sorted) whose turns are identical after normalising, or near copies of each other."""
    by_text: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_text.setdefault(turns_text(ex), []).append(i)
    groups = list(by_text.values())  # one entry per distinct text; near copies are searched among them
    reps = [examples[rows[0]] for rows in groups]
    pairs = near_pairs(reps, candidate_pairs(shingle_hashes(list(by_text))), threshold)
    linked = {i for pair in pairs for i in pair}
    found = [sorted(r for g in group for r in groups[g]) for group in components(len(groups), pairs)]
    found += [rows for g, rows in enumerate(groups) if len(rows) > 1 and g not in linked]
    return sorted(found, key=lambda g: g[0])


def _answers_agree(examples: list[Example], rows: list[int], threshold: float) -> bool:
    """Whether every row's final answer is (nearly) the first row's: only then is keeping one row safe."""
    finals = [answer_text(examples[r]) for r in rows]
    first = finals[0]
    distinct = {a for a in finals if a != first}
    if not distinct:
        return True
    first_set = _set_of(first)
    return all(similar(first_set, _set_of(a), threshold) for a in distinct)


def check_duplicates(
    examples: list[Example], groups: list[list[int]], threshold: float = NEAR_DUP_THRESHOLD
) -> list[DoctorFinding]:
    findings = []
    for rows in groups:
        keys = {full_key(examples[r]) for r in rows}
        sample = excerpt(first_words(examples[rows[0]]))
        if len(keys) == 1:
            kind = "exact_duplicate"
            same = (
                "identical"
                if len({examples[r] for r in rows}) == 1
                else "identical apart from case, spacing or punctuation"
            )
            detail = f"{len(rows)} rows are {same}: {sample}."
        else:
            kind = "near_duplicate"
            detail = (
                f"{len(rows)} rows are near copies (question and answer each ≥ {threshold:.0%} the same): {sample}."
            )
        if _answers_agree(examples, rows, threshold):
            fix, hint = "dedupe", "Keep one of them: repeats make the model memorise this row and skew the mix."
        else:
            fix = None
            detail += " Their answers differ."
            hint = "Decide which answer is right and delete the other rows: keeping one blindly may keep the wrong one."
        findings.append(DoctorFinding(kind, Severity.WARNING, tuple(rows), detail, fix, hint))
    return findings


def check_conflicting_answers(examples: list[Example], threshold: float = NEAR_DUP_THRESHOLD) -> list[DoctorFinding]:
    """The same prompt (system and history included) with answers that are not near copies of each other."""
    by_prompt: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        key = prompt_key(ex)
        if key is not None:
            by_prompt.setdefault(key, []).append(i)
    findings = []
    for rows in by_prompt.values():
        if len(rows) < 2 or _answers_agree(examples, rows, threshold):
            continue
        shown: dict[str, str] = {}
        for r in rows:
            answer = examples[r].messages[-1].shown
            shown.setdefault(normalize(answer), excerpt(answer, 40))
        quoted = " / ".join(list(shown.values())[:3]) + (" / …" if len(shown) > 3 else "")
        detail = (
            f"{len(rows)} rows ask the same ({excerpt(first_words(examples[rows[0]]))}) but answer "
            f"differently: {quoted}."
        )
        hint = (
            "Keep the right answer and delete the others, or make the prompts say what differs. If varied "
            "answers are intended (creative prompts), ignore this."
        )
        findings.append(DoctorFinding("conflicting_answers", Severity.WARNING, tuple(rows), detail, None, hint))
    return findings


def robust_z(values: list[float], floor: float = LOG_SCALE_FLOOR) -> list[float]:
    """z-scores of log(1 + value) against the median, scaled by the MAD (at least `floor`)."""
    logs = [math.log1p(v) for v in values]
    median = statistics.median(logs)
    mad = statistics.median(abs(x - median) for x in logs)
    scale = max(1.4826 * mad, floor)  # 1.4826 * MAD estimates the standard deviation of a normal
    return [(x - median) / scale for x in logs]


def check_length_outliers(
    examples: list[Example], lengths: list[int], unit: str = "tokens", z_limit: float = OUTLIER_Z
) -> list[DoctorFinding]:
    """Rows far longer than is typical, and answers near-empty (nothing but punctuation, or far shorter)."""
    if len(examples) < MIN_ROWS_FOR_STATS:
        return []
    findings = []
    median_len = statistics.median(lengths)
    for i, z in enumerate(robust_z(lengths)):
        if z > z_limit:
            detail = (
                f"{lengths[i]} {unit}, {lengths[i] / max(median_len, 1):.1f}× the median ({median_len:g}): "
                f"{excerpt(first_words(examples[i]))}."
            )
            hint = "Check it is not several rows run together or pasted junk; drop it or split it."
            findings.append(DoctorFinding("length_outlier", Severity.INFO, (i,), detail, "drop", hint))
    shortest = [min(_answer_pairs(ex), key=lambda pair: len(pair[1]), default=("", "")) for ex in examples]
    sizes = [len(norm) for _, norm in shortest]
    median_answer = statistics.median(sizes)
    for i, z in enumerate(robust_z(sizes)):
        answer, norm = shortest[i]
        empty = not norm
        if empty or (z < -z_limit and len(norm.split()) <= NEAR_EMPTY_WORDS):
            detail = (
                f"near-empty answer {excerpt(answer, 30)} ({sizes[i]} characters of letters or digits; the "
                f"median answer has {median_answer:g}) to {excerpt(first_words(examples[i]))}."
            )
            hint = "Write a real answer, or drop the row: the model learns to answer like this."
            findings.append(
                DoctorFinding(
                    "length_outlier", Severity.WARNING if empty else Severity.INFO, (i,), detail, "drop", hint
                )
            )
    return sorted(findings, key=lambda f: f.rows)


def _answer_pairs(example: Example) -> list[tuple[str, str]]:
    """(answer, normalised answer) for each trained part of a row."""
    if example.text is not None:
        return [(example.text, normalized(example)[0][1])]
    pairs = zip(example.messages, normalized(example), strict=True)
    return [(m.shown, norm) for m, (_, norm) in pairs if m.role == "assistant"]


@lru_cache(maxsize=8192)
def char_script(ch: str) -> str | None:
    """The script of a letter from its Unicode name ('LATIN SMALL LETTER A' -> LATIN); None otherwise."""
    if not ch.isalpha():
        return None
    try:
        word = unicodedata.name(ch).split(" ", 1)[0]
    except ValueError:
        return None
    return _SCRIPT_ALIASES.get(word, word)


def dominant_script(text: str) -> str | None:
    if text.isascii():  # the common case, at C speed
        return "LATIN" if any(c.isalpha() for c in text) else None
    counts: Counter[str] = Counter()
    for ch, n in Counter(text).items():
        script = char_script(ch)
        if script:
            counts[script] += n
    return counts.most_common(1)[0][0] if counts else None


def check_language_outliers(examples: list[Example], majority: float = SCRIPT_MAJORITY) -> list[DoctorFinding]:
    """Rows written in another script than (nearly) all the others; one finding per script."""
    scripts = [
        dominant_script(" ".join(m.content for m in ex.messages) if ex.text is None else ex.text) for ex in examples
    ]
    known = [s for s in scripts if s]
    if len(known) < 2:
        return []
    main, count = Counter(known).most_common(1)[0]
    if count / len(known) < majority:
        return []  # a multilingual dataset: no single script is "normal"
    findings = []
    for script in sorted({s for s in known if s != main}):
        rows = tuple(i for i, s in enumerate(scripts) if s == script)
        detail = (
            f"{len(rows)} row{'s' * (len(rows) != 1)} written in {script.title()} script while "
            f"{count / len(known):.0%} of the rows are {main.title()}: {excerpt(first_words(examples[rows[0]]))}."
        )
        hint = "Drop them unless the model should learn this language too; then add more rows in it."
        findings.append(DoctorFinding("language_outlier", Severity.WARNING, rows, detail, "drop", hint))
    return findings


def check_missing_eos(
    samples: list[Sample | str], cutoff_len: int, eos_id: int, eos_text: str = "EOS"
) -> list[DoctorFinding]:
    """`samples` are whole (untruncated) tokenized rows, or the error text of rows that failed to tokenize.
    A row trains on its EOS only if the last trained label within cutoff_len is the EOS id."""
    cut, no_eos, broken, lost = [], [], [], 0
    longest, last_seen = 0, None
    for i, s in enumerate(samples):
        if isinstance(s, str):
            broken.append(i)
            continue
        full = [t for t in s.labels if t != IGNORE_INDEX]
        kept = [t for t in s.labels[:cutoff_len] if t != IGNORE_INDEX]
        if not full or (kept and kept[-1] == eos_id):
            continue
        if full[-1] == eos_id:  # whole, it ends with EOS: cutoff_len cut it off
            cut.append(i)
            longest = max(longest, s.full_length)
            lost += not kept
        else:
            no_eos.append(i)
            last_seen = full[-1]
    findings = []
    if cut:
        skipped = f"; {lost} lose their whole answer, so training skips them" if lost else ""
        detail = (
            f"{len(cut)} row{'s' * (len(cut) != 1)} are cut by cutoff_len={cutoff_len} before their final "
            f"{eos_text} (longest: {longest} tokens){skipped}. Trained without an end, the model learns to run on."
        )
        hint = f"Raise the cutoff length to {longest} or more, or drop these rows."
        findings.append(DoctorFinding("missing_eos", Severity.WARNING, tuple(cut), detail, "drop", hint))
    if no_eos:
        detail = (
            f"{len(no_eos)} row{'s' * (len(no_eos) != 1)} end their answer with token {last_seen}, not the EOS "
            f"id {eos_id} ({eos_text}): the tokenizer does not turn its EOS text into the EOS token, so the "
            "model never learns to stop."
        )
        hint = "Use a tokenizer whose eos_token is a single special token (or fix its chat template)."
        findings.append(DoctorFinding("missing_eos", Severity.WARNING, tuple(no_eos), detail, None, hint))
    if broken:
        reason = samples[broken[0]]
        detail = f"{len(broken)} row{'s' * (len(broken) != 1)} cannot be tokenized: {reason}"
        hint = "Drop them, or use a chat template that accepts these conversations; training would fail on them."
        findings.append(DoctorFinding("missing_eos", Severity.WARNING, tuple(broken), detail, "drop", hint))
    return findings


def split_sides(kept: list[int], val_size: float, seed: int) -> dict[int, str]:
    """row -> "train" | "validation", exactly as training splits the rows it keeps (studio.training.stages)."""
    eval_idx, train_idx = split_indices(len(kept), val_size, seed)
    sides = {kept[i]: "validation" for i in eval_idx}
    sides.update({kept[i]: "train" for i in train_idx})
    return sides


def check_split_leakage(
    examples: list[Example], groups: list[list[int]], sides: dict[int, str], val_size: float, seed: int, exact: bool
) -> list[DoctorFinding]:
    """Duplicate groups with rows on both sides of the split: the eval loss then measures memorisation."""
    findings = []
    for rows in groups:
        placed = [sides[r] for r in rows if r in sides]
        n_val = placed.count("validation")
        if not n_val or n_val == len(placed):
            continue
        assumed = (
            "" if exact else " (split assuming every row keeps an answer token; give a tokenizer for the exact split)"
        )
        detail = (
            f"near copies on both sides of the split (val_size={val_size:g}, seed={seed}): {n_val} in validation, "
            f"{len(placed) - n_val} in training{assumed}: {excerpt(first_words(examples[rows[0]]))}."
        )
        hint = "Keep one of them, so the validation loss measures generalisation, not recall."
        findings.append(DoctorFinding("leakage", Severity.WARNING, tuple(rows), detail, "dedupe", hint))
    return findings


def check_eval_leakage(
    examples: list[Example], against: list[Example], against_name: str, threshold: float = NEAR_DUP_THRESHOLD
) -> list[DoctorFinding]:
    """Rows that (nearly) repeat a row of an evaluation dataset: training on them inflates its scores."""
    both = examples + against
    pairs = candidate_pairs(shingle_hashes([turns_text(ex) for ex in both]), split=len(examples))
    hits = [i for i, _ in near_pairs(both, pairs, threshold)]
    if not hits:
        return []
    rows = sorted(set(hits))
    detail = (
        f"{len(rows)} row{'s' * (len(rows) != 1)} nearly repeat rows of '{against_name}' (question and answer "
        f"each ≥ {threshold:.0%} the same): {excerpt(first_words(examples[rows[0]]))}."
    )
    hint = f"Drop them from the training data, or '{against_name}' no longer measures anything unseen."
    return [DoctorFinding("leakage", Severity.WARNING, tuple(rows), detail, "drop", hint)]


# ---------------------------------------------------------------- the report


def diagnose(
    name: str,
    examples: list[Example],
    tokenizer: Any = None,
    cutoff_len: int = 512,
    val_size: float = 0.0,
    seed: int = 42,
    against: list[Example] | None = None,
    against_name: str = "the evaluation set",
    train_on_prompt: bool = False,
) -> DoctorReport:
    """Every check over `examples`. Without a tokenizer, lengths are in characters and the EOS check is
    skipped (said in an info finding)."""
    if cutoff_len < 1:
        raise DataError(f"The cutoff length must be at least 1 token, got {cutoff_len}.")
    if not 0 <= val_size < 1:
        raise DataError(f"val_size must be in [0, 1), got {val_size}; 0.1 holds out a tenth.")
    settings: dict[str, Any] = {"cutoff_len": cutoff_len, "val_size": val_size, "seed": seed}
    findings: list[DoctorFinding] = []
    kept = list(range(len(examples)))
    if tokenizer is None:
        lengths, unit = [_chars(ex) for ex in examples], "characters"
        findings.append(
            DoctorFinding(
                "missing_eos",
                Severity.INFO,
                (),
                "Skipped: no tokenizer was given, so EOS and token lengths were not "
                "checked (lengths are in characters).",
                None,
                "Examine with a model's tokenizer to check them.",
            )
        )
    else:
        samples = [_tokenize(tokenizer, ex, train_on_prompt) for ex in examples]
        lengths = [s.full_length if isinstance(s, Sample) else 0 for s in samples]
        unit = "tokens"
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            findings.append(
                DoctorFinding(
                    "missing_eos",
                    Severity.WARNING,
                    (),
                    "The tokenizer has no EOS token id.",
                    None,
                    "Use a tokenizer with an eos_token: without it no answer can end.",
                )
            )
        else:
            findings += check_missing_eos(samples, cutoff_len, eos_id, str(tokenizer.eos_token))
        kept = [i for i, s in enumerate(samples) if isinstance(s, Sample) and _trains(s, cutoff_len)]
        settings["tokenizer"] = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)

    try:
        groups = duplicate_groups(examples)
        findings += check_duplicates(examples, groups)
        findings += check_conflicting_answers(examples)
        findings += check_length_outliers(examples, lengths, unit)
        findings += check_language_outliers(examples)
        if val_size > 0 and len(kept) > 1:
            sides = split_sides(kept, val_size, seed)
            findings += check_split_leakage(examples, groups, sides, val_size, seed, exact=tokenizer is not None)
        if against:
            settings["against"] = against_name
            findings += check_eval_leakage(examples, against, against_name)
    finally:
        normalized.cache_clear()  # it holds the dataset's text: a long-lived server should not keep it
    return DoctorReport(name, len(examples), findings, fingerprint(examples), settings)


def _chars(example: Example) -> int:
    return len(example.text) if example.text is not None else sum(len(m.shown) for m in example.messages)


def _tokenize(tokenizer: Any, example: Example, train_on_prompt: bool) -> Sample | str:
    try:
        return build_sample(tokenizer, example, FULL_LENGTH, train_on_prompt)
    except DataError as e:
        return str(e)


def _trains(sample: Sample, cutoff_len: int) -> bool:
    """Training keeps a row only if a trained token survives the cutoff (studio.training.stages.sft.split_data)."""
    return any(label != IGNORE_INDEX for label in sample.labels[:cutoff_len])


# ---------------------------------------------------------------- fixes


def fixable_kinds(findings: list[DoctorFinding]) -> list[str]:
    """The kinds that have at least one finding with a safe fix, in KINDS order."""
    present = {f.kind for f in findings if f.fix}
    return [k for k in KINDS if k in present]


def rows_to_remove(findings: list[DoctorFinding], kinds: set[str] | None = None) -> dict[int, str]:
    """row -> the kind of finding that removes it. Drops first; then each dedupe group keeps its first row
    that no drop removed, so a group never vanishes because its first row was also dropped."""
    chosen = [f for f in findings if f.fix and (kinds is None or f.kind in kinds)]
    removed: dict[int, str] = {}
    for f in chosen:
        if f.fix == "drop":
            for r in f.rows:
                removed.setdefault(r, f.kind)
    for f in chosen:
        if f.fix == "dedupe":
            survivors = [r for r in f.rows if r not in removed]
            for r in survivors[1:]:
                removed.setdefault(r, f.kind)
    return removed


def apply_fixes(
    registry: DatasetRegistry, name: str, report: DoctorReport, new_name: str, kinds: set[str] | None = None
) -> tuple[DatasetEntry, FixResult]:
    """Register a copy of `name` without the rows the safe fixes remove, as `new_name`. The original is
    never changed. Raises DataError, registering nothing, when the name is taken or the data changed."""
    new_name = (new_name or "").strip()
    problem = validate_dataset_name(new_name)
    if problem:
        raise DataError(problem)
    taken = {e.name.lower(): e.name for e in registry.list()}
    if new_name.lower() in taken:
        raise DataError(
            f"A dataset named '{taken[new_name.lower()]}' already exists. Choose another name for the fixed copy "
            f"(e.g. '{free_name(registry, new_name)}'); '{name}' itself is never changed."
        )
    if report.dataset != name:
        raise DataError(f"The report is about '{report.dataset}', not '{name}'. Examine '{name}' first.")
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise DataError(f"Unknown finding kinds: {', '.join(unknown)}. Choose from: {', '.join(KINDS)}.")
    entry = registry.get(name)
    examples = registry.load_examples(name)
    if len(examples) != report.rows or (report.fingerprint and fingerprint(examples) != report.fingerprint):
        raise DataError(
            f"Dataset '{name}' is not what was examined (it has {len(examples)} rows now; the report has "
            f"{report.rows}). Examine it again, then apply the fixes."
        )
    removed = rows_to_remove(report.findings, kinds)
    if not removed:
        raise DataError(f"Nothing to fix in '{name}': no finding of the chosen kinds has a safe fix. No copy made.")
    keep = [ex for i, ex in enumerate(examples) if i not in removed]
    if not keep:
        raise DataError(f"The fixes would remove all {len(examples)} rows of '{name}'. Choose fewer kinds of fixes.")
    result = FixResult(name, len(keep), tuple(sorted(removed)), dict(Counter(removed.values())))
    description = f"Dataset doctor fix of '{name}': {result.summary()}."
    with tempfile.TemporaryDirectory(prefix="studio-doctor-") as tmp:
        path, fmt = write_examples(keep, Path(tmp) / f"{new_name}.jsonl")
        new_entry, _, _ = registry.add(
            new_name, path, fmt=fmt, description=description, clean=CleanOptions.from_dict(entry.clean)
        )
    return new_entry, result


def write_examples(examples: list[Example], path: Path) -> tuple[Path, str]:
    """Examples as JSON Lines: openai messages, or {"text"} rows for a plain-text dataset -> (path, format)."""
    plain = [ex.text is not None for ex in examples]
    if any(plain) and not all(plain):
        raise DataError("The examples mix plain texts and conversations; a dataset holds one or the other.")
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row: dict[str, Any] = (
                {"text": ex.text} if ex.text is not None else {"messages": openai_messages(ex.messages)}
            )
            if ex.tools:
                row["tools"] = json.loads(ex.tools)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path, "text" if all(plain) else "openai"


def free_name(registry: DatasetRegistry, base: str) -> str:
    """`base`, or `base-2`, `base-3`, … : the first name no dataset has."""
    taken = {e.name.lower() for e in registry.list()}
    candidate, n = base, 2
    while candidate.lower() in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def row_numbers(rows: tuple[int, ...], limit: int = 12) -> str:
    """1-based row numbers as a person counts them (and as the Datasets tab's preview shows them)."""
    shown = ", ".join(str(r + 1) for r in rows[:limit])
    return shown + (f" … (+{len(rows) - limit} more)" if len(rows) > limit else "")


# -- preference pairs: what the doctor adds ---------------------------------------------------


def pair_prompt_key(prompt: tuple[Message, ...]) -> str:
    """A pair's prompt, normalised: the same question asked the same way."""
    return "\n".join(f"{m.role}: {normalize(m.content)}" for m in prompt)


def identical_pairs(pairs: list[PreferencePair]) -> list[DoctorFinding]:
    """The same prompt, chosen and rejected more than once: weighs that pair more than the others."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[(pair_prompt_key(p.prompt), normalize(p.chosen), normalize(p.rejected))].append(i)
    return [
        DoctorFinding(
            "exact_duplicate",
            Severity.WARNING,
            tuple(rows),
            f"{len(rows)} identical pairs for “{excerpt(pairs[rows[0]].prompt[-1].content)}”",
            "dedupe",
            "Keep one: repeated pairs weigh more than the others and are memorised.",
        )
        for rows in groups.values()
        if len(rows) > 1
    ]


def contradicting_pairs(pairs: list[PreferencePair]) -> list[DoctorFinding]:
    """The same prompt with the two answers preferred both ways: the pairs cancel out (label noise)."""
    seen: dict[tuple[str, str, str], int] = {}
    findings = []
    for i, p in enumerate(pairs):
        key, chosen, rejected = pair_prompt_key(p.prompt), normalize(p.chosen), normalize(p.rejected)
        j = seen.get((key, rejected, chosen))
        if j is not None:
            findings.append(
                DoctorFinding(
                    "conflicting_answers",
                    Severity.WARNING,
                    (j, i),
                    f"the same two answers to “{excerpt(p.prompt[-1].content)}” are preferred both ways",
                    None,
                    "Decide which answer is better and drop the other row: opposite labels cancel out.",
                )
            )
        seen.setdefault((key, chosen, rejected), i)
    return findings


def length_bias(pairs: list[PreferencePair]) -> list[DoctorFinding]:
    """Share of pairs whose chosen answer is the longer: well above half, the model may learn that longer
    is better instead of what makes the answer better (a known DPO failure: verbose answers)."""
    if len(pairs) < MIN_PAIRS_FOR_BIAS:
        return []
    longer = [i for i, p in enumerate(pairs) if len(p.chosen) > len(p.rejected)]
    share = len(longer) / len(pairs)
    if share <= LENGTH_BIAS_SHARE:
        return []
    return [
        DoctorFinding(
            "length_bias",
            Severity.WARNING,
            tuple(longer),
            f"the chosen answer is the longer one in {share:.0%} of the pairs (above {LENGTH_BIAS_SHARE:.0%})",
            None,
            "The model may learn that longer is better. Add pairs where the shorter answer wins, or use a "
            "length-normalised loss (SimPO, or DPO with ipo).",
        )
    ]


def preference_findings(pairs: list[PreferencePair]) -> list[DoctorFinding]:
    """What the dataset doctor says about preference pairs beyond the row checks."""
    return [*identical_pairs(pairs), *contradicting_pairs(pairs), *length_bias(pairs)]
