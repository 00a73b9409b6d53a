"""Verify, don't predict: every branch of a variant's proof on the machine that serves it, with fakes (no
engine): the judgement (pass, garbage, empty), the machine-local record, the engine's tries in dtype order
(crash, garbage, pass) for a candidate (out of the rollout, engine-less, never restarted) and for a baseline
(the stack stops, naming it), then the controller and the router with a candidate out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config import load_config
from serving.engine import verify
from serving.engine.hardware import Capabilities
from serving.engine.server import Unfit, VariantServer, Verification
from serving.models import family, verification
from serving.models.manifest import MANIFEST_NAME
from serving.rollout.controller import Rollout
from serving.rollout.signals import ReplicaStarted, VariantUnfit
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant
from tests.clock import Clock

# LLMServer's own `async def __del__` is never awaited by Python; Serve does not call it either.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine 'LLMServer.__del__' was never awaited")
REPO = Path(__file__).resolve().parents[2]
FACTS = verify.facts()
RIGHT = {item.id: f"The capital is {item.expected[0] if item.expected else '?'}." for item in FACTS}
# What int8 in bfloat16 answered on an AMX Xeon for the capital of France.
GARBAGE = "L'Étoile, la Cité, le Poulsadère, la France, la France"


def answers(texts: dict[str, str] | str) -> tuple[verify.Answer, ...]:
    return tuple(verify.Answer(i.id, i.prompt, texts if isinstance(texts, str) else texts[i.id]) for i in FACTS)


# -- the judgement ---------------------------------------------------------------------------------------------
def test_the_facts_are_the_first_facts_of_the_shipped_set() -> None:
    assert [i.id for i in FACTS] == [f"fact-00{n}" for n in range(1, verify.FACTS + 1)]
    assert FACTS[0].prompt == "What is the capital of France?"


def test_answers_like_the_reference_pass_with_their_agreement() -> None:
    close = dict(RIGHT, **{FACTS[0].id: "The capital is Paris, of course."})
    verdict = verify.judge("int8", "float16", answers(close), "fp16", answers(RIGHT))
    assert verdict.fit
    assert verdict.dtype == "float16"
    assert verdict.same_answers == verify.FACTS - 1
    assert verdict.agreement == 1.0  # every word of the reference's, and one sentence more
    assert verdict.reason == "agreement 1.00 with fp16 on 6 facts (5 the same)"


def test_agreement_is_the_share_of_the_references_words_said_in_any_order() -> None:
    assert (
        verify.overlap(verify.words("The capital of France is Paris."), verify.words("Paris is the capital of France"))
        == 1.0
    )
    assert verify.overlap(verify.words("The capital is Paris"), verify.words("The capital is Rome")) == 0.75
    assert verify.overlap([], []) == 1.0
    assert verify.overlap([], ["a"]) == 0.0


def test_garbage_is_unfit_with_the_answers_side_by_side() -> None:
    verdict = verify.judge("int8", "bfloat16", answers(GARBAGE), "fp16", answers(RIGHT))
    assert not verdict.fit
    assert verdict.agreement == 0.0
    assert "below the floor 0.3 in bfloat16" in verdict.reason
    assert "int8 said \"L'Étoile, la Cité" in verdict.reason
    assert "fp16 said 'The capital is" in verdict.reason


def test_garbage_that_echoes_the_question_does_not_agree() -> None:
    """The words the question already says do not count: "la France, la France" says nothing of Paris."""
    france = answers(RIGHT)[:1]
    echo = (verify.Answer(france[0].id, france[0].prompt, GARBAGE),)
    assert verify.agreement(echo, france) == (0.0, 0)
    assert verify.answer_words(france[0]) == ["paris"]


def test_the_floor_is_the_callers() -> None:
    half = {k: ("The capital is Paris." if n % 2 else v) for n, (k, v) in enumerate(RIGHT.items())}
    assert verify.judge("awq", "float16", answers(half), "fp16", answers(RIGHT), floor=0.5).fit
    assert not verify.judge("awq", "float16", answers(half), "fp16", answers(RIGHT), floor=0.99).fit


def test_an_engine_that_answers_nothing_at_all_is_unfit_even_as_the_reference() -> None:
    verdict = verify.judge("fp16", "float16", answers("  "), None, ())
    assert not verdict.fit
    assert verdict.reason == "it answered 6 facts with nothing in float16"
    # A random-weight model may end an answer at once, or answer bytes that decode to no word: those are answers.
    some = dict(RIGHT, **{FACTS[2].id: "", FACTS[3].id: "\ufffd\ufffd"})
    assert verify.judge("fp16", "float16", answers(some), None, ()).fit


def test_a_floor_of_zero_judges_only_that_the_variant_runs() -> None:
    assert verify.judge("awq", "float16", answers(""), "fp16", answers(RIGHT), floor=0.0).fit


def test_a_reference_that_answers_passes_alone() -> None:
    verdict = verify.judge("fp16", "float16", answers(RIGHT), None, ())
    assert verdict.fit
    assert verdict.reference is None


def test_a_missing_answer_counts_as_no_agreement() -> None:
    score, same = verify.agreement(answers(RIGHT)[:3], answers(RIGHT))
    assert (score, same) == (0.5, 3)


# -- the machine-local record ------------------------------------------------------------------------------------
@pytest.fixture
def record_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "records"
    monkeypatch.setenv(verify.RECORD_DIR_ENV, str(where))
    return where


def variant_folder(tmp_path: Path, sha: str = "a" * 64) -> Path:
    folder = tmp_path / "int8-w8a8"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST_NAME).write_text(json.dumps({"weights_sha256": sha}))
    return folder


MACHINE = {"cpu": "Intel Xeon", "cpu_flags": ["amx_tile"], "gpu": None, "vllm": "0.32.0", "torch": "2.13.0"}
OTHER = {**MACHINE, "cpu_flags": ["avx2"]}


def test_the_record_keeps_each_machines_verdict_and_the_dtype_that_passed(tmp_path: Path, record_dir: Path) -> None:
    folder = variant_folder(tmp_path)
    passed = verify.judge("int8", "bfloat16", answers(RIGHT), "fp16", answers(RIGHT))
    path = verify.write_entry(folder, passed, MACHINE)
    verify.write_entry(folder, verify.unfit("int8", [verify.Attempt("float16", "crashed")]), OTHER)
    assert path.parent == record_dir
    record = json.loads(path.read_text())
    assert record["folder"] == str(folder.resolve())
    assert len(record["machines"]) == 2
    entry = record["machines"][verify.machine_key(MACHINE)]
    assert entry["machine"] == MACHINE
    assert entry["verdict"]["answers"][0]["prompt"] == "What is the capital of France?"
    assert verify.kept_dtype(folder, MACHINE) == "bfloat16"
    assert verify.kept_dtype(folder, OTHER) is None  # unfit there: nothing kept


def test_a_record_of_other_weights_is_stale(tmp_path: Path, record_dir: Path) -> None:
    folder = variant_folder(tmp_path)
    verify.write_entry(folder, verify.judge("int8", "bfloat16", answers(RIGHT), "fp16", answers(RIGHT)), MACHINE)
    variant_folder(tmp_path, sha="b" * 64)  # rebuilt
    assert verify.read_entry(folder, MACHINE) is None
    assert verify.kept_dtype(folder, MACHINE) is None


def test_this_machines_key_names_what_decides_the_kernels() -> None:
    found = verify.machine()
    assert set(found) == {"cpu", "cpu_flags", "gpu", "vllm", "torch"}
    assert found["vllm"]
    assert found["torch"]
    assert verify.machine_key(found) == verify.machine_key(dict(found))
    assert verify.machine_key(found) != verify.machine_key({**found, "torch": "0"})


# -- the engine's proof, its engine faked -------------------------------------------------------------------------
class FakeLLMConfig:
    def __init__(self, folder: Path) -> None:
        self.model_loading_config = type("Loading", (), {"model_source": str(folder)})()
        self.model_id = "demo-chat"
        self.engine_kwargs: dict[str, Any] = {}

    def update_engine_kwargs(self, **kwargs: Any) -> None:
        self.engine_kwargs.update(kwargs)

    def get_or_create_callback(self) -> Any:
        return type("Callback", (), {"ctx": type("Ctx", (), {"run_init_node": True})()})()


class FakeReference:
    """The reference deployment's handle: `verification_answers.remote()`."""

    def __init__(self, found: tuple[verify.Answer, ...]) -> None:
        self.verification_answers = self
        self.found = found

    async def remote(self) -> list[dict[str, str]]:
        return [{"id": a.id, "prompt": a.prompt, "text": a.text} for a in self.found]


def proving(behaviour: dict[str, str]) -> type[VariantServer]:
    """A VariantServer whose engine, per dtype, "crashes" at start, answers "garbage", or answers "right"."""

    class Proved(VariantServer):
        started: list[str]
        stopped: int
        told: list[VariantUnfit | str]

        async def start_engine(self, llm_config: Any) -> None:
            self.__dict__.setdefault("started", []).append(llm_config.engine_kwargs["dtype"])
            self._llm_config = llm_config
            if behaviour[llm_config.engine_kwargs["dtype"]] == "crash":
                raise RuntimeError("EngineDeadError: scale_C: scalar path not implemented!")
            self.engine = object()  # type: ignore[assignment]

        async def answer_facts(self) -> tuple[verify.Answer, ...]:
            dtype = self._llm_config.engine_kwargs["dtype"]
            return answers(GARBAGE if behaviour[dtype] == "garbage" else RIGHT)

        async def stop_engine(self) -> None:
            self.__dict__["stopped"] = self.__dict__.get("stopped", 0) + 1
            self.engine = None

        async def linear_kernels(self) -> list[str]:
            return ["CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel/onednn"]

        async def announce_started(self) -> None:
            self.__dict__.setdefault("told", []).append("started")

        async def announce_unfit(self) -> None:
            self.__dict__.setdefault("told", []).append(VariantUnfit(self.variant, "r", self.unfit or "", 0.0))

    return Proved


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serving.engine.server.detect", lambda gpu=False: Capabilities("cpu", "Intel Xeon", amx=True))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")


def start(server_cls: type[VariantServer], folder: Path, plan: Verification) -> VariantServer:
    async def run() -> VariantServer:
        server = server_cls.__new__(server_cls)
        reference = FakeReference(answers(RIGHT)) if plan.reference else None
        await server.__init__(  # type: ignore[misc]
            FakeLLMConfig(folder), variant="int8", precision="int8", verification=plan, reference=reference
        )
        await asyncio.sleep(0)  # let the announcement task run
        return server

    return asyncio.run(run())


CANDIDATE = Verification(reference="fp16", required=False)
BASELINE = Verification(reference="fp16", required=True)


@pytest.mark.usefixtures("cpu")
def test_a_variant_that_answers_right_in_its_first_dtype_is_fit(tmp_path: Path, record_dir: Path) -> None:
    server = start(proving({"float16": "right", "bfloat16": "crash"}), variant_folder(tmp_path), CANDIDATE)
    assert server.started == ["float16"]
    assert server.unfit is None
    assert server.facts["dtype"] == "float16"
    assert server.facts["verification"]["fit"]
    assert server.facts["verification"]["attempts"] == [{"dtype": "float16", "outcome": "passed"}]
    assert Path(server.facts["verification"]["record"]).parent == record_dir


@pytest.mark.usefixtures("cpu")
def test_a_crash_is_tried_again_in_the_next_dtype_and_that_one_is_kept(tmp_path: Path, record_dir: Path) -> None:
    folder = variant_folder(tmp_path)
    server = start(proving({"float16": "crash", "bfloat16": "right"}), folder, CANDIDATE)
    assert server.started == ["float16", "bfloat16"]
    assert server.stopped == 1
    assert server.facts["dtype"] == "bfloat16"
    assert "passed verification" not in server.facts["dtype_reason"]
    attempts = server.facts["verification"]["attempts"]
    assert attempts[0]["outcome"].startswith("the engine failed in float16: RuntimeError: EngineDeadError")
    assert verify.kept_dtype(folder) == "bfloat16"
    # The next start on this machine tries the kept dtype first, and needs no second engine.
    again = start(proving({"float16": "crash", "bfloat16": "right"}), folder, CANDIDATE)
    assert again.started == ["bfloat16"]
    assert "passed verification on this machine" in again.facts["dtype_reason"]


@pytest.mark.usefixtures("cpu")
def test_a_candidate_unfit_in_every_dtype_stays_up_engine_less_and_out_of_the_rollout(
    tmp_path: Path, record_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="serving.engine.server"):
        server = start(proving({"float16": "garbage", "bfloat16": "crash"}), variant_folder(tmp_path), CANDIDATE)
    assert server.engine is None  # no engine held, and LLMServer's health check passes without one:
    assert asyncio.run(server.check_health()) is None  # Serve never restarts it
    assert server.unfit is not None
    assert server.unfit.startswith("unfit on this machine: agreement 0.00 with fp16 is below the floor")
    assert "the engine failed in bfloat16" in server.unfit
    assert server.facts["unfit"] == server.unfit
    assert [s.reason for s in server.told] == [server.unfit]
    assert "out of the rollout" in caplog.text
    with pytest.raises(Unfit, match="variant int8 is unfit on this machine"):
        asyncio.run(server.chat(object()))
    with pytest.raises(Unfit):
        asyncio.run(server.generate_one_token())
    assert asyncio.run(server.verification_answers()) == []
    entry = json.loads(server.record.read_text())  # type: ignore[union-attr]
    (kept,) = entry["machines"].values()
    assert not kept["verdict"]["fit"]
    assert kept["verdict"]["reference_answers"][0]["text"] == RIGHT["fact-001"]


@pytest.mark.usefixtures("cpu")
def test_a_baseline_unfit_in_every_dtype_stops_the_start_with_its_own_name(tmp_path: Path, record_dir: Path) -> None:
    with pytest.raises(Unfit, match=r"^int8 is unfit on this machine: the engine failed in float16.*bfloat16"):
        start(proving({"float16": "crash", "bfloat16": "crash"}), variant_folder(tmp_path), BASELINE)


@pytest.mark.usefixtures("cpu")
def test_a_pinned_dtype_is_the_only_try(tmp_path: Path, record_dir: Path) -> None:
    cls = proving({"float16": "crash", "bfloat16": "right"})

    async def pinned() -> VariantServer:
        server = cls.__new__(cls)
        await server.__init__(  # type: ignore[misc]
            FakeLLMConfig(variant_folder(tmp_path)),
            variant="int8",
            precision="int8",
            pinned_dtype="float16",
            verification=CANDIDATE,
            reference=FakeReference(answers(RIGHT)),
        )
        return server

    server = asyncio.run(pinned())
    assert server.started == ["float16"]
    assert server.unfit is not None


# -- the controller and the router with a candidate out -------------------------------------------------------
def test_the_controller_takes_an_unfit_candidate_out_of_every_tier_it_is_candidate_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(REPO / "deploy" / "tiny.yaml")
    config = config.model_copy(
        update={"rollback": config.rollback.model_copy(update={"state_file": tmp_path / "state.json"})}
    )
    rollout = Rollout(config, Clock())
    assert rollout.weights()["batch"] == 50.0
    with caplog.at_level(logging.WARNING, logger="serving.rollout"):
        rollout.variant_unfit(VariantUnfit("awq", "r1", "unfit on this machine: crashed", 1.0))
        rollout.variant_unfit(VariantUnfit("awq", "r1", "unfit on this machine: crashed", 31.0))  # the reminder
    assert rollout.weights() == {"premium": 0.0, "standard": 50.0, "batch": 0.0}
    assert rollout.snapshot(0).unfit == {"awq": "unfit on this machine: crashed"}
    status = rollout.status().tiers
    assert status["batch"].unfit == "unfit on this machine: crashed"
    assert status["batch"].live_weight == 0.0
    assert status["standard"].unfit is None
    assert caplog.text.count("reason=Unfit object=tier/batch") == 1
    assert "crashed" not in (tmp_path / "state.json").read_text()  # not saved: the next start proves it anew


def tiny_rollout(tmp_path: Path, clock: Clock) -> Rollout:
    config = load_config(REPO / "deploy" / "tiny.yaml")
    rollback = config.rollback.model_copy(update={"state_file": tmp_path / "state.json"})
    return Rollout(config.model_copy(update={"rollback": rollback}), clock)


def test_a_candidate_whose_replica_keeps_dying_is_taken_out_and_a_baseline_never(tmp_path: Path) -> None:
    clock = Clock()
    rollout = tiny_rollout(tmp_path, clock)
    for n in range(4):  # the first start and three restarts of its one replica, a minute apart
        rollout.replica_started(ReplicaStarted("awq", f"r{n}", clock.now))
        rollout.replica_started(ReplicaStarted("int8", f"r{n}", clock.now))  # batch's baseline
        clock.now += 60
    assert set(rollout.unfit) == {"awq"}
    assert "its replicas started 4 times in 10 minutes for 1 replica(s)" in rollout.unfit["awq"]
    assert rollout.weights()["batch"] == 0.0


def test_restarts_spread_wider_than_the_window_are_not_a_crash_loop(tmp_path: Path) -> None:
    clock = Clock()
    rollout = tiny_rollout(tmp_path, clock)
    for n in range(6):
        rollout.replica_started(ReplicaStarted("awq", f"r{n}", clock.now))
        clock.now += 301  # at most two starts in any ten minutes
    assert rollout.unfit == {}


ADMIN = {"authorization": "Bearer demo-admin"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}


def unfit_router() -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    tiers = dict(config.tiers)
    tiers["standard"] = tiers["standard"].model_copy(update={"weight": 100.0})
    core = RouterCore(config.model_copy(update={"tiers": tiers}), {n: FakeVariant(n) for n in config.variants})
    core.unfit = {"int8": "unfit on this machine: the engine failed in float16"}
    return core


async def test_the_router_never_sends_to_an_unfit_variant_and_refuses_overrides_to_it_with_the_reason() -> None:
    core = unfit_router()
    app = create_app(lambda: core)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        pinned = await http.post("/v1/chat/completions", json=CHAT, headers={**ADMIN, "x-variant": "int8"})
        routed = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-standard"})
        ready = await http.get("/ready")
        models = await http.get("/v1/models", headers=ADMIN)
    assert pinned.status_code == 503
    error = pinned.json()["error"]
    assert error["code"] == "variant_unfit"
    assert error["message"] == "variant int8 is unfit on this machine: the engine failed in float16"
    assert routed.status_code == 200
    assert routed.headers["x-served-variant"] == "fp16"  # weight 100 on int8, yet its baseline answers
    assert core.variants["int8"].requests == []  # type: ignore[attr-defined]
    assert ready.status_code == 200
    assert ready.json()["unfit"] == core.unfit
    assert "int8" not in ready.json()["variants"]
    assert models.json()["data"][0]["variants"]["int8"]["unfit"] == core.unfit["int8"]


# -- the build's verification, its probe faked ----------------------------------------------------------------------
def built(tmp_path: Path) -> Path:
    for variant in family.TINY.variants:
        folder = tmp_path / variant.folder
        folder.mkdir()
        (folder / MANIFEST_NAME).write_text(json.dumps({"weights_sha256": variant.name * 8}))
    return tmp_path


def fake_probe(monkeypatch: pytest.MonkeyPatch, behaviour: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
    """`probe.run_probe` per (folder, dtype): "crash" (the child failed), "garbage" or "right" answers."""
    probed: list[tuple[str, str]] = []

    def run_probe(folder: Path, eval_set: Path | None = None, dtype: str | None = None) -> dict[str, Any]:
        probed.append((folder.name, str(dtype)))
        what = behaviour.get((folder.name, str(dtype)), "right")
        if what == "crash":
            raise RuntimeError(f"probing {folder} failed:\nTraceback ...\nc10::Error: scale_C: scalar path")
        texts = answers(GARBAGE if what == "garbage" else RIGHT)
        return {
            "verification_answers": [{"id": a.id, "prompt": a.prompt, "text": a.text} for a in texts],
            "linear_kernels": ["CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel/onednn"],
        }

    monkeypatch.setattr("serving.models.probe.run_probe", run_probe)
    monkeypatch.setattr("serving.engine.hardware.detect", lambda gpu=False: Capabilities("cpu", "Intel Xeon", amx=True))
    return probed


def test_the_build_judges_each_variant_against_fp16_and_tries_the_next_dtype(
    tmp_path: Path, record_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = built(tmp_path)
    probed = fake_probe(monkeypatch, {("int8-w8a8", "float16"): "crash", ("awq-w4a16", "float16"): "garbage"})
    smol_floor = dataclasses.replace(family.TINY, min_agreement=verify.MIN_AGREEMENT)  # tiny's own floor is 0
    verdicts = verification.verify_family(smol_floor, out)
    assert probed == [
        ("fp16", "float16"),
        ("int8-w8a8", "float16"),
        ("int8-w8a8", "bfloat16"),
        ("awq-w4a16", "float16"),
        ("awq-w4a16", "bfloat16"),
    ]
    assert (verdicts["fp16"].fit, verdicts["int8"].fit, verdicts["awq"].fit) == (True, True, True)
    assert verdicts["int8"].dtype == "bfloat16"
    assert verdicts["int8"].attempts[0].outcome.endswith("c10::Error: scale_C: scalar path")
    assert verdicts["int8"].where == "build"
    assert verdicts["awq"].attempts[0].outcome.startswith("agreement 0.00 with fp16 is below the floor 0.3")
    out_lines = capsys.readouterr().out
    assert "int8  fit in bfloat16: agreement 1.00 with fp16 on 6 facts (6 the same); kernels" in out_lines
    assert verify.kept_dtype(out / "int8-w8a8") == "bfloat16"
    # Again on this machine: nothing is probed, every verdict comes from the record.
    probed.clear()
    again = verification.verify_family(smol_floor, out)
    assert probed == []
    assert again["int8"].dtype == "bfloat16"
    assert "(verified before)" in capsys.readouterr().out


def test_the_build_stops_judging_when_the_base_cannot_run(
    tmp_path: Path, record_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = built(tmp_path)
    probed = fake_probe(monkeypatch, {("fp16", "float16"): "crash", ("fp16", "bfloat16"): "crash"})
    verdicts = verification.verify_family(family.TINY, out)
    assert list(verdicts) == ["fp16"]
    assert not verdicts["fp16"].fit
    assert [p[0] for p in probed] == ["fp16", "fp16"]
