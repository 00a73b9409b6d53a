"""The release-gate policy of a config: a tier with `require_gate` gives its candidate weight only if the
candidate's manifest holds a passed gate against that tier's baseline, and a `high_impact` tier only if
that gate also carries a named sign-off. `serving check`, `apply` and `serve` call `gate_problems` and
refuse a config that breaks it; each problem names the tier, the variant and the command that fixes it.

The recorded measures are judged again under the config's thresholds, so tightening `gate:` in the
config cannot leave an old pass standing.
"""

from __future__ import annotations

from pathlib import Path

from serving.config import Config, ConfigError
from serving.models import manifest
from serving.release import scoring


def gate_problems(config: Config, config_path: Path | None = None) -> list[str]:
    """What each gated tier is missing, one sentence per tier; empty when the config keeps the policy."""
    with_config = f" --config {config_path}" if config_path else ""
    problems = []
    for name, tier in config.tiers.items():
        if not tier.require_gate or tier.candidate is None or tier.weight == 0:
            continue
        where = f"tier {name!r}: candidate {tier.candidate!r} may not get weight {tier.weight:g}"
        candidate, baseline = config.variants[tier.candidate], config.variants[tier.baseline]
        if candidate.path is None or baseline.path is None:
            problems.append(f"{where}: the gate needs local folders with manifests, and a hub model has none")
            continue
        try:
            found = manifest.read_manifest(candidate.path)
            baseline_sha = manifest.read_manifest(baseline.path)["weights_sha256"]
        except manifest.ManifestError as exc:
            problems.append(f"{where}: {exc}")
            continue
        evaluate = f"serving evaluate {candidate.path} --baseline {baseline.path}{with_config}"
        gate = manifest.gate_for(found, baseline_sha)
        if gate is None or gate["candidate_weights_sha256"] != found["weights_sha256"]:
            problems.append(f"{where}: it has no release gate against the baseline {tier.baseline!r}; run: {evaluate}")
            continue
        if not gate["passed"]:
            problems.append(
                f"{where}: it failed its release gate against {tier.baseline!r} (report {gate['report']['path']}); "
                "give it weight 0, or evaluate a better candidate"
            )
            continue
        failing = [c for c in scoring.judge(gate["measures"], config.gate.thresholds()) if not c.passed]
        if failing:
            names = ", ".join(
                f"{c.name}={c.value:.4g} ({c.kind} {c.threshold:g})" for c in failing if c.value is not None
            )
            problems.append(
                f"{where}: its gate passed, but fails this config's gate thresholds ({names}); run: {evaluate}"
            )
            continue
        if tier.high_impact and not any(s["report_sha256"] == gate["report"]["sha256"] for s in gate["sign_offs"]):
            problems.append(
                f"{where}: the tier is high-impact and its passed gate has no named sign-off; after reading "
                f"{gate['report']['path']}, run: serving sign-off {candidate.path} --baseline {baseline.path} --by NAME"
            )
    return problems


def enforce(config: Config, config_path: Path | None = None) -> None:
    """Raises ConfigError listing every problem, if there are any."""
    problems = gate_problems(config, config_path)
    if problems:
        where = f"{config_path} " if config_path else ""
        raise ConfigError(f"{where}breaks the release-gate policy:\n" + "\n".join(f"  {p}" for p in problems))
