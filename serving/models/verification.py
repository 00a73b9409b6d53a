"""`serving models build`'s last step: each built variant proves it runs right here (`serving.engine.verify`).

The fp16 base answers the verification facts first; each quantized variant then answers them in a real vLLM
engine (`serving.models.probe`, one child process per try) in each viable activation dtype in turn
(`serving.engine.hardware.dtype_order`), and is judged against the base's answers. The verdict goes to the
machine-local record, where the served engines find the dtype that passed; a variant already verified on
this machine (same weights, same CPU flags, GPU, vLLM and torch) is not probed again.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from serving.engine import verify
from serving.models import family, probe


def verify_variant(
    folder: Path,
    name: str,
    reference: str | None,
    reference_answers: tuple[verify.Answer, ...],
    floor: float = verify.MIN_AGREEMENT,
    found: dict[str, object] | None = None,
) -> verify.Verdict:
    """Probes the variant in each dtype in turn until one passes; the verdict holds every attempt."""
    from serving.engine import hardware

    order = verify.dtype_choices(folder, hardware.detect(), found=found)
    attempts: list[verify.Attempt] = []
    last: verify.Verdict | None = None
    for choice in order:
        try:
            report = probe.run_probe(folder, dtype=choice.dtype)
        except RuntimeError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            attempts.append(verify.crashed(choice.dtype, RuntimeError(lines[-1] if lines else str(exc))))
            continue
        answers = verify.answers_from(report["verification_answers"])
        verdict = verify.judge(name, choice.dtype, answers, reference, reference_answers, floor)
        if verdict.fit:
            attempts.append(verify.Attempt(choice.dtype, "passed"))
            kernels = ", ".join(k.split("/", 1)[-1] for k in report["linear_kernels"] if "/" in k)
            why = f"{verdict.reason}; kernels {kernels}" if kernels else verdict.reason
            return dataclasses.replace(verdict, reason=why, attempts=tuple(attempts), where="build")
        attempts.append(verify.Attempt(choice.dtype, verdict.reason))
        last = verdict
    return dataclasses.replace(verify.unfit(name, attempts, last), where="build")


def verify_family(models: family.Family, out: Path) -> dict[str, verify.Verdict]:
    """Verifies every built variant of the family on this machine, printing one line each."""
    found = verify.machine()
    verdicts: dict[str, verify.Verdict] = {}
    reference_answers: tuple[verify.Answer, ...] = ()
    print(f"verifying on this machine ({found['cpu']}; vLLM {found['vllm']}, torch {found['torch']}) ...", flush=True)
    for variant in models.variants:
        folder = out / variant.folder
        if not folder.is_dir():
            continue
        reference = None if variant.is_base else models.base.name
        entry = verify.read_entry(folder, found)
        started = time.monotonic()
        if entry is not None and entry["verdict"]["fit"]:
            verdict = verdict_from(entry["verdict"])
            said = "verified before"
        else:
            verdict = verify_variant(folder, variant.name, reference, reference_answers, models.min_agreement, found)
            verify.write_entry(folder, verdict, found)
            said = f"verified in {time.monotonic() - started:.0f} s"
        if variant.is_base:
            reference_answers = verdict.answers
        verdicts[variant.name] = verdict
        mark = f"fit in {verdict.dtype}" if verdict.fit else "UNFIT on this machine"
        print(f"  {variant.name:5} {mark}: {verdict.reason} ({said})", flush=True)
        if variant.is_base and not verdict.fit:
            break  # nothing else can be judged against a base that does not run
    print(f"  record: {verify.record_dir()}", flush=True)
    return verdicts


def verdict_from(data: dict[str, object]) -> verify.Verdict:
    """A verdict as the record keeps it."""
    fields = dict(data)
    fields["answers"] = verify.answers_from(fields.get("answers") or [])  # type: ignore[arg-type]
    fields["reference_answers"] = verify.answers_from(fields.get("reference_answers") or [])  # type: ignore[arg-type]
    fields["attempts"] = tuple(verify.Attempt(**a) for a in fields.get("attempts") or [])  # type: ignore[attr-defined]
    return verify.Verdict(**fields)  # type: ignore[arg-type]
