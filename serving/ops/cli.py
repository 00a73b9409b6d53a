"""The `serving` command."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving import __version__


def _family_and_out(args: argparse.Namespace) -> tuple[Any, Path]:
    from serving.models import family
    from serving.models.build import default_out

    models = family.get(args.family)
    return models, args.out or default_out(models)


def _models_build(args: argparse.Namespace) -> int:
    from serving.models.build import BuildError, build_family

    models, out = _family_and_out(args)
    try:
        built = build_family(models, out, force=args.force, names=args.variant or None)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, found in built.items():
        print(f"  {name:5} {found['weights_sha256'][:16]}  {out / models.variant(name).folder}")
    if args.no_verify:
        return 0
    from serving.models.verification import verify_family

    verdicts = verify_family(models, out)
    return 0 if verdicts.get(models.base.name) is None or verdicts[models.base.name].fit else 1


def _models_show(args: argparse.Namespace) -> int:
    from serving.models import manifest

    models, out = _family_and_out(args)
    status = 0
    for variant in models.variants:
        folder = out / variant.folder
        if not folder.is_dir():
            print(
                f"{variant.name}: not built in {out} (build it: serving models build --family {models.name})",
                file=sys.stderr,
            )
            status = 1
            continue
        try:
            found = manifest.read_manifest(folder, verify_weights=args.verify)
        except manifest.ManifestError as exc:
            print(f"{variant.name}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(found, indent=2, sort_keys=True) if args.json else _summary(found))
    return status


def _summary(found: dict[str, object]) -> str:
    quant = found["quantization"] or {}
    assert isinstance(quant, dict)
    method = f"{quant.get('method')} {quant.get('scheme')}" if quant else "none (base)"
    return (
        f"{found['variant']:5}  precision={found['precision']:5} quantization={method:16} "
        f"weights={str(found['weights_sha256'])[:16]} created={found['created_at']}"
    )


def _serve(args: argparse.Namespace) -> int:
    from serving.ops.launch import serve

    return serve(args.config, address=args.address)


def _serve_config(args: argparse.Namespace) -> int:
    from serving.deploy.serve_config import render, serve_config

    generated = serve_config(args.config, base_dir=args.base_dir, http_host=args.http_host)
    command = " ".join(
        ["serving serve-config", str(args.config)]
        + [
            f"{flag} {value}"
            for flag, value in (("--base-dir", args.base_dir), ("--http-host", args.http_host))
            if value
        ]
    )
    text = render(generated, command=command)
    if args.output is None:
        print(text, end="")
    else:
        args.output.write_text(text)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from serving.ops.launch import apply

    return apply(args.config)


def _check(args: argparse.Namespace) -> int:
    from serving.config import load_config
    from serving.ops.launch import check_state_file
    from serving.release.policy import enforce

    config = load_config(args.config)
    enforce(config, args.config)  # serve and apply refuse the same (serving.ops.launch)
    print(f"{args.config}: valid ({len(config.variants)} variants, {len(config.tiers)} tiers, {len(config.keys)} keys)")
    for name, variant in config.variants.items():
        # Nothing is downloaded here: a hub model is fetched by each engine's node when it starts.
        where = f"hub {variant.hub} (not checked here)" if variant.hub else f"folder {variant.path}"
        print(f"  {name:6} {variant.precision:5} {where}")
    check_state_file(config)  # raises ConfigError: `main` prints it, exits 2, as `serving serve` does
    state_file = config.rollback.state_file
    print(f"  rollout state {state_file}: {'reads fine' if state_file.is_file() else 'none yet (a first start)'}")
    return 0


def _rollout_reset_state(args: argparse.Namespace) -> int:
    import getpass
    import socket

    from serving.config import load_config
    from serving.rollout import store

    path = args.state or load_config(args.config).rollback.state_file
    try:
        aside = store.reset(path, f"{getpass.getuser()}@{socket.gethostname()}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"the damaged state file is kept as {aside}; {path} now starts every candidate at weight 0 "
        "(fail-safe) until a config is applied (`serving apply CONFIG`)"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from serving.config import GateConfig, load_config
    from serving.release.evaluate import EvaluateError, evaluate, sign_off

    gate = load_config(args.config).gate if args.config else GateConfig()
    try:
        done = evaluate(args.candidates, args.baseline, args.eval_set, args.out, gate, record=not args.no_record)
        for evaluation in done:
            built = evaluation.report
            failing = [c for c in built["verdict"]["checks"] if not c["passed"]]
            why = "; ".join(f"{c['name']} {c['value']:.4g} ({c['kind']} {c['threshold']:g})" for c in failing)
            print(
                f"{built['candidate']['variant']} against {built['baseline']['variant']}: "
                f"{'PASS' if evaluation.passed else 'FAIL'}{': ' + why if why else ''}"
            )
            print(
                f"  report {evaluation.markdown_path} (plots beside it), {evaluation.json_path} "
                f"sha256 {evaluation.digest[:16]}"
            )
            if args.sign_off and not args.no_record and evaluation.passed and not _is_noise(built):
                sign_off(Path(built["candidate"]["folder"]), args.sign_off, args.baseline)
                print(f"  signed off by {args.sign_off}")
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_record:
        print("nothing recorded in the manifests (--no-record)")
    return 0 if all(e.passed for e in done) else 1


def _is_noise(built: dict[str, Any]) -> bool:
    return bool(built["candidate"]["weights_sha256"] == built["baseline"]["weights_sha256"])


def _sign_off(args: argparse.Namespace) -> int:
    from serving.release.evaluate import EvaluateError, sign_off

    try:
        gate = sign_off(args.candidate, args.by, args.baseline)
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"signed off by {args.by}: {args.candidate} against {gate['baseline']['variant']} ({gate['report']['path']})")
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    from serving.ops.launch import rollout_status

    status = rollout_status()
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else rollout_table(status))
    return 0


def _rollout_operate(args: argparse.Namespace) -> int:
    """pause, resume or abort one tier's rollout, through the controller, recorded with who asked."""
    import getpass
    import socket

    import ray

    from serving.ops.launch import connect

    by = f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        tier = ray.get(connect().operate.remote(args.tier, args.rollout_command, by))
    except ValueError as exc:  # Ray raises the controller's ValueError as one
        print(f"error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
        return 1
    print(
        f"tier {args.tier}: {args.rollout_command} recorded (by {by}); phase {tier['phase']}, "
        f"live weight {tier['live_weight']:g}%"
    )
    return 0


def at(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def rollout_table(status: dict[str, Any], events: int = 10) -> str:
    """The rollout status as a table a person reads: one row per tier, then each tier's last events."""
    rows = [("TIER", "PHASE", "BASELINE", "CANDIDATE", "WEIGHT", "LIVE", "NEXT STEP", "CHECKS (! failed)")]
    for name, tier in sorted(status["tiers"].items()):
        judged = ", ".join(
            f"{c['check']}={c['value']:.3f}{'!' if c['failed'] else ''} (max {c['threshold']:g}, n={c['samples']})"
            for c in tier["checks"]
            if c["value"] is not None
        )
        waiting = ", ".join(f"{c['check']} n={c['samples']}" for c in tier["checks"] if c["value"] is None)
        shown = "; ".join(part for part in (judged, f"too few samples: {waiting}" if waiting else "") if part)
        step = tier.get("next_step")
        if tier.get("paused"):
            upcoming = f"paused by {tier['paused']['by']}"
        elif step:
            upcoming = f"{step['weight']:g}% at {at(step['at'])[11:]}"
        else:
            upcoming = "-"
        rows.append(
            (
                name,
                tier["phase"],
                tier["baseline"],
                tier["candidate"] or "-",
                f"{tier['configured_weight']:g}",
                f"{tier['live_weight']:g}",
                upcoming,
                shown or "(not judged yet)",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    if status.get("fail_safe"):
        lines.append(f"FAIL-SAFE: {status['fail_safe']}")
    for name, tier in sorted(status["tiers"].items()):
        for warm in tier.get("left_out", []):
            lines.append(
                f"left out: tier {name}: {warm['samples']} latency samples of {warm['variant']}, from "
                f"{at(warm['start'])[11:19]} to {at(warm['until'])[11:]} (replica {warm['replica']} started: its "
                "first seconds)"
            )
    for name, tier in sorted(status["tiers"].items()):
        for event in tier["history"][-events:]:
            lines.append(describe_event(name, event))
    return "\n".join(lines)


def describe_event(tier: str, event: dict[str, Any]) -> str:
    kind = event.get("kind", "rollback")  # state files from before kinds were recorded hold rollbacks only
    head = f"{at(event['at'])} tier {tier}: {event['candidate']}"
    if kind == "rollback":
        why = "; ".join(
            f"{r} {event['values'][r]:.4f} > {event['thresholds'][r]} (n={event['samples'][r]})"
            for r in event["reasons"]
        )
        return f"rolled back: {head} {event['weight_before']:g}% -> 0: {why}"
    if kind in ("step", "promoted"):
        return f"{kind}: {head} {event['weight_before']:g}% -> {event['weight_after']:g}%"
    return f"{kind}: {head} at {event['weight_before']:g}% by {event['by']}"


def parser() -> argparse.ArgumentParser:
    from serving.evals import DEMO_SET
    from serving.models.build import REPO_ROOT
    from serving.models.family import DEFAULT, FAMILIES

    DEFAULT_CONFIG = REPO_ROOT / "deploy" / "demo.yaml"

    top = argparse.ArgumentParser(prog="serving", description="Precision-aware LLM serving.")
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="build and inspect the demo model families")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    build = models_commands.add_parser("build", help="build a demo family (fp16, int8 W8A8, awq W4A16)")
    show = models_commands.add_parser("show", help="print the provenance manifest of each variant")
    for action in (build, show):
        action.add_argument(
            "--family", choices=list(FAMILIES), default=DEFAULT.name, help="smol (real) or tiny (default: %(default)s)"
        )
        action.add_argument("--out", type=Path, help="the family's folder (default: models/FAMILY)")
    build.add_argument("--force", action="store_true", help="rebuild even what is up to date")
    build.add_argument("--variant", action="append", choices=["fp16", "int8", "awq"], help="only this variant")
    build.add_argument(
        "--no-verify",
        action="store_true",
        help="skip proving each variant on this machine (serving.engine.verify; the engines still do at start-up)",
    )
    build.set_defaults(func=_models_build)
    show.add_argument("--json", action="store_true", help="print the whole manifests as JSON")
    show.add_argument("--verify", action="store_true", help="re-hash the weights against the manifests")
    show.set_defaults(func=_models_show)

    serve = commands.add_parser("serve", help="serve the configured stack until Ctrl-C")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    serve.add_argument(
        "--address",
        help="deploy onto this running Ray cluster (auto, or ray://HOST:10001) instead of starting Ray here; "
        "returns once the application is ready and leaves it running",
    )
    serve.set_defaults(func=_serve)
    serve_config = commands.add_parser(
        "serve-config", help="print a Ray Serve config (serve deploy, KubeRay serveConfigV2) for a config file"
    )
    serve_config.add_argument("config", type=Path, help="the config file (validated first)")
    serve_config.add_argument(
        "--base-dir", type=Path, help="where its relative paths resolve on the cluster (default: the file's folder)"
    )
    serve_config.add_argument("--http-host", help="where Serve listens (default: the config's server.host)")
    serve_config.add_argument("-o", "--output", type=Path, help="write the file here instead of printing it")
    serve_config.set_defaults(func=_serve_config)
    apply = commands.add_parser("apply", help="apply a changed config file to the running stack, in place")
    apply.add_argument("config", type=Path, help="the config file")
    apply.set_defaults(func=_apply)
    rollout = commands.add_parser(
        "rollout", help="the rollout controller: phases, live weights, rollbacks; pause, resume, abort"
    )
    rollout_commands = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    status = rollout_commands.add_parser("status", help="print each tier's phase, weights, checks and rollbacks")
    status.add_argument("--json", action="store_true", help="print the whole status as JSON")
    status.set_defaults(func=_rollout_status)
    for verb, what in (
        ("pause", "hold a progressing tier at its live weight (checks still roll back)"),
        ("resume", "let a paused tier step again, a whole interval from now"),
        ("abort", "roll a tier's candidate back now (weight 0); an apply that changes the tier re-enables it"),
    ):
        operate = rollout_commands.add_parser(verb, help=what)
        operate.add_argument("tier", help="the tier's name in the config")
        operate.set_defaults(func=_rollout_operate)
    reset_state = rollout_commands.add_parser(
        "reset-state",
        help="keep a damaged state file aside and start every candidate at weight 0 (with the stack stopped)",
    )
    reset_state.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="the config naming the state file (default: %(default)s)"
    )
    reset_state.add_argument("--state", type=Path, help="the state file itself (instead of --config's)")
    reset_state.set_defaults(func=_rollout_reset_state)
    evaluate = commands.add_parser(
        "evaluate", help="the release gate: a candidate variant against its baseline on an evaluation set"
    )
    evaluate.add_argument(
        "candidates",
        nargs="+",
        type=Path,
        metavar="CANDIDATE",
        help="candidate variant folders (e.g. models/smol/awq-w4a16); the baseline runs once for all",
    )
    evaluate.add_argument("--baseline", type=Path, help="the baseline's folder (default: the family's base, fp16)")
    evaluate.add_argument(
        "--eval-set", type=Path, default=DEMO_SET, help="a JSONL evaluation set (default: %(default)s)"
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("reports"), help="where the report goes (default: %(default)s)"
    )
    evaluate.add_argument("--config", type=Path, help="take the thresholds from this config's gate: section")
    evaluate.add_argument("--no-record", action="store_true", help="measure only; leave the manifest as it is")
    evaluate.add_argument("--sign-off", metavar="NAME", help="and record NAME's sign-off on each passed gate")
    evaluate.set_defaults(func=_evaluate)
    sign = commands.add_parser("sign-off", help="record a named sign-off on a candidate's passed release gate")
    sign.add_argument("candidate", type=Path, help="the candidate variant's folder")
    sign.add_argument("--by", required=True, help="who signs off (recorded in the manifest)")
    sign.add_argument("--baseline", type=Path, help="the baseline's folder (default: the family's base, fp16)")
    sign.set_defaults(func=_sign_off)
    check = commands.add_parser("check", help="validate a config file without applying it")
    check.add_argument("config", type=Path, help="the config file")
    check.set_defaults(func=_check)
    return top


def main(argv: list[str] | None = None) -> int:
    from serving.config import ConfigError

    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:  # a bad file, or no running stack: the message says which
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
