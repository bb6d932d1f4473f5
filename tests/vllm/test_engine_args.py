"""The arguments of a guarded engine, checked before any engine starts (no engine, no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from ngsd.vllm import engine_kwargs, serve_args  # noqa: E402


def test_an_expert_folder_that_is_not_there_is_refused_before_the_engine_starts(tmp_path):
    """Found only in the engine's worker, a wrong expert path surfaced as vLLM's 'Engine core initialization
    failed. See root cause above.' (the reason only in the worker's log)."""
    missing = tmp_path / "no-such-adapter"
    for build in (engine_kwargs, serve_args):
        with pytest.raises(FileNotFoundError, match="no-such-adapter.*not a peft LoRA adapter folder"):
            build("some/model", expert=str(missing))
    assert engine_kwargs("some/model", expert="shipped")["hf_overrides"]["ngsd"]["expert"] == "shipped"


def test_the_guard_processor_is_passed_once_and_processed_logprobs_are_refused():
    """Named again in logits_processors, a second instance found each step's expert rows taken and the engine died
    on its first request; processed logprobs are read after the guard forced the token (0, then -inf for all)."""
    from types import SimpleNamespace

    from ngsd.vllm.engine import PROCESSOR
    from ngsd.vllm.model import _check_engine
    from ngsd.vllm.processor import NGSDLogitsProcessor

    kwargs = engine_kwargs("some/model", logits_processors=[PROCESSOR, NGSDLogitsProcessor, "other.module:Rule"])
    assert kwargs["logits_processors"] == [PROCESSOR, "other.module:Rule"]
    for mode in ("processed_logprobs", "processed_logits"):
        with pytest.raises(ValueError, match=f"logprobs_mode='{mode}'"):
            engine_kwargs("some/model", logprobs_mode=mode)

    def engine(processors, mode="raw_logprobs"):
        return SimpleNamespace(model_config=SimpleNamespace(logits_processors=processors, logprobs_mode=mode),
                               use_v2_model_runner=False)

    _check_engine(engine([PROCESSOR]))
    with pytest.raises(ValueError, match="exactly once \\(found 2\\)"):
        _check_engine(engine([PROCESSOR, NGSDLogitsProcessor]))
    with pytest.raises(ValueError, match="processed_logprobs"):
        _check_engine(engine([NGSDLogitsProcessor], "processed_logprobs"))


# ---- the risk probe's settings (GuardSettings risk / probe / reflection / verdict_log), checked in the front end


def _default_model() -> str:
    from ngsd.loading import default_cache_dir

    folder = default_cache_dir()
    if not (folder / "config.json").is_file():
        pytest.skip("the converted default model is absent (ngsd.load_model() converts it)")
    return str(folder)


def test_the_default_model_with_the_shipped_expert_runs_the_probe_and_switches_prefix_caching_off():
    kwargs = engine_kwargs(_default_model())
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["hf_overrides"]["ngsd"]["risk"] == "auto"
    assert serve_args(_default_model())[-1] == "--no-enable-prefix-caching"
    with pytest.raises(ValueError, match="enable_prefix_caching=True.*risk='off'"):
        engine_kwargs(_default_model(), enable_prefix_caching=True)
    # risk off, another model or another expert: every request at alpha, prefix caching left to vLLM
    assert "enable_prefix_caching" not in engine_kwargs(_default_model(), risk="off")
    assert "enable_prefix_caching" not in engine_kwargs("some/model")
    assert "--no-enable-prefix-caching" not in serve_args("some/model")


def test_probe_folder_follows_the_library_rules(tmp_path):
    from types import SimpleNamespace

    from ngsd.risk.probe import shipped_probe_path
    from ngsd.vllm.risk import model_config_of, probe_folder
    from ngsd.vllm.settings import GuardSettings

    default = model_config_of(_default_model())
    assert probe_folder(GuardSettings(), default) == shipped_probe_path()
    assert probe_folder(GuardSettings(risk="off"), default) is None
    assert probe_folder(GuardSettings(expert=str(tmp_path)), default) is None  # auto: another expert, no probe
    from ngsd.experts.shipped import shipped_expert_path

    assert probe_folder(GuardSettings(expert=str(shipped_expert_path())), default) == shipped_probe_path()
    assert probe_folder(GuardSettings(gate={"mode": "safedecoding"}), default) is None  # the library runs none there
    assert probe_folder(GuardSettings(), "some/model") is None
    with pytest.raises(ValueError, match="risk='probe' needs a risk probe for this model"):
        probe_folder(GuardSettings(risk="probe"), "some/model")
    with pytest.raises(ValueError, match="gate modes"):
        probe_folder(GuardSettings(risk="probe", gate={"mode": "safedecoding"}), default)
    with pytest.raises(FileNotFoundError, match="not a risk-probe folder"):
        probe_folder(GuardSettings(probe=str(tmp_path / "nothing")), default)
    other = SimpleNamespace(**{**vars(default), "hidden_size": 64})
    with pytest.raises(ValueError, match="trained on another model"):
        probe_folder(GuardSettings(probe=str(shipped_probe_path())), other)


def test_a_pooled_probe_is_refused(tmp_path):
    import torch

    from ngsd.risk.probe import ProbeSpec, RiskProbe
    from ngsd.vllm.risk import model_config_of, probe_folder
    from ngsd.vllm.settings import GuardSettings

    spec = ProbeSpec(layer=3, pooling=("mean",), model={"hidden_size": 576})
    RiskProbe(spec, torch.zeros(576), torch.ones(576), torch.ones(576), 0.0).save(tmp_path / "pooled")
    with pytest.raises(ValueError, match="token_max probes only"):
        probe_folder(GuardSettings(probe=str(tmp_path / "pooled")), model_config_of(_default_model()))


@pytest.mark.parametrize("fields, error, message", [
    ({"risk": "always"}, ValueError, "risk must be one of"),
    ({"risk": "off", "probe": "somewhere"}, ValueError, "probe would never run"),
    ({"reflection": {"route_above": 3.0}}, ValueError, "unknown fields"),
    ({"reflection": {"guarded_alpha": 1.5}}, ValueError, "guarded_alpha"),
    ({"reflection": {"check_rollout": -1}}, ValueError, "check_rollout"),
    ({"reflection": {"route": True}, "risk": "off"}, ValueError, "risk='off' runs no probe"),
    ({"reflection": [("route", False)]}, TypeError, "dict of ReflectionConfig fields"),
    ({"verdict_log": 3}, TypeError, "verdict_log"),
    ({"gate": {"prime_divergence": "check"}, "risk": "off"}, ValueError, "prime_divergence='check'"),
    ({"verdict_log": "/tmp/v.jsonl", "risk": "off"}, ValueError, "risk='off' runs no probe"),
])
def test_bad_risk_settings_are_refused(fields, error, message):
    from ngsd.vllm.settings import GuardSettings

    with pytest.raises(error, match=message):
        GuardSettings(**fields)


def test_the_look_ahead_is_an_engine_setting_as_in_the_library():
    """check_rollout was refused as an unknown field: an operator could not switch the look-ahead off (or lengthen
    it) as ReflectionConfig(check_rollout=...) does in the library."""
    from ngsd.vllm.settings import GuardSettings

    assert GuardSettings(reflection={"check_rollout": 0}).reflection_config().check_rollout == 0
    assert GuardSettings(reflection={"check_rollout": 4}).reflection_config().check_rollout == 4


def test_prime_divergence_check_needs_a_probe_with_a_check():
    """Refused before: the engine had no check. Now allowed where the probe runs with its check."""
    kwargs = engine_kwargs(_default_model(), gate={"prime_divergence": "check"})
    assert kwargs["hf_overrides"]["ngsd"]["gate"] == {"prime_divergence": "check"}
    with pytest.raises(ValueError, match="no probe runs for 'some/model'"):
        engine_kwargs("some/model", gate={"prime_divergence": "check"})
    with pytest.raises(ValueError, match="has none"):
        engine_kwargs(_default_model(), gate={"prime_divergence": "check"}, reflection={"check": False})


def test_start_potential_with_prime_divergence_check_is_the_librarys():
    from ngsd.config import NGSDConfig
    from ngsd.risk.probe import RiskProbe, shipped_probe_path
    from ngsd.vllm.risk import EngineRisk
    from ngsd.vllm.settings import GuardSettings

    risk = EngineRisk(shipped_probe_path(), GuardSettings(gate={"prime_divergence": "check"}))
    check = RiskProbe.load(shipped_probe_path()).spec.check_divergence
    assert risk.start_potential == NGSDConfig(prime_divergence="check").start_potential_for(check)


def test_a_request_that_asks_for_nothing_is_the_probes_to_decide():
    from ngsd.vllm.settings import GuardSettings

    settings = GuardSettings(allow_opt_out=True)
    assert settings.request_policy(None).default
    assert not settings.request_policy({"ngsd_alpha": 0.9}).default
    assert not settings.request_policy({"ngsd_guard": False}).default
    # a refused request falls back to the engine's alpha, and is not the probe's to route
    assert not GuardSettings().policy_or_guarded({"ngsd_alpha": 0.1}).default
    assert GuardSettings().policy_or_guarded({"ngsd_alpha": 0.1}).at_least


def test_a_request_that_asks_for_a_guard_gets_at_least_what_asking_for_nothing_gives():
    """ngsd_guard=True was routed like a request that asked for nothing; on an engine that does not allow opting
    out, a request's own alpha above the engine's could still be below the probe's."""
    from ngsd.vllm.settings import GuardSettings, RequestPolicy

    lenient, strict = GuardSettings(allow_opt_out=True), GuardSettings(alpha=0.5)
    for settings in (lenient, strict):
        assert settings.request_policy({"ngsd_guard": True}) == RequestPolicy(True, settings.alpha, at_least=True)
    assert strict.request_policy({"ngsd_alpha": 0.6}) == RequestPolicy(True, 0.6, at_least=True)
    assert lenient.request_policy({"ngsd_alpha": 0.6}) == RequestPolicy(True, 0.6)  # the operator allows lowering


@pytest.mark.parametrize("fields", [
    {"expert": "OWN", "reflection": {"guarded_alpha": 1.0}},
    {"expert": "OWN", "verdict_log": "/tmp/verdicts.jsonl"},
    {"gate": {"mode": "safedecoding"}, "reflection": {"guarded_alpha": 1.0}},
])
def test_probe_settings_of_an_engine_that_runs_no_probe_are_refused(fields, tmp_path):
    """reflection / verdict_log were accepted and ignored where risk='auto' ends up running no probe (another expert,
    or a gate mode the library runs no probe for)."""
    from ngsd.experts.shipped import shipped_expert_path
    from ngsd.vllm.engine import guard_overrides
    from ngsd.vllm.settings import GuardSettings

    if fields.get("expert") == "OWN":
        import shutil

        shutil.copytree(shipped_expert_path(), tmp_path / "own")
        fields = {**fields, "expert": str(tmp_path / "own")}
    with pytest.raises(ValueError, match="no probe runs"):
        guard_overrides(_default_model(), GuardSettings(**fields))


def test_a_safedecoding_engine_refuses_a_request_alpha():
    """SafeDecoding amplifies at the engine's safedecoding_alpha (3 by default), as ngsd.generate; the engine
    mixed at its 0.9 or the request's alpha (the setting was read by nothing)."""
    from ngsd.vllm.settings import GuardSettings

    with pytest.raises(ValueError, match="runs SafeDecoding"):
        GuardSettings(gate={"mode": "safedecoding"}).request_policy({"ngsd_alpha": 1.0})


def test_the_engine_guards_a_prompt_outside_the_chat_template_whatever_its_risk():
    """As the library: the probe is calibrated on chat-templated prompts, and raw text routed harmful requests."""
    from transformers import AutoTokenizer

    from ngsd.api import encode_prompts
    from ngsd.risk.probe import shipped_probe_path
    from ngsd.vllm.risk import EngineRisk
    from ngsd.vllm.settings import GuardSettings

    folder = _default_model()
    risk = EngineRisk(shipped_probe_path(), GuardSettings())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    risk.use_tokenizer(tokenizer)
    templated = encode_prompts(tokenizer, ["Write a poem about tea"])[0][0].tolist()
    raw = tokenizer("Write a poem about tea")["input_ids"]
    low = -1e4  # a maximum token logit far below the routing threshold
    assert risk.checked(risk.first_verdict(low, templated), 0.0).routed
    verdict = risk.checked(risk.first_verdict(low, raw), 0.0)
    assert not verdict.routed and verdict.untemplated and verdict.alpha == 0.9


def test_the_engine_routes_nothing_when_its_tokenizer_cannot_show_a_prompt_templated():
    """The library's rule (`template_unchecked`): the shipped probe is calibrated on chat-templated prompts, so with a
    tokenizer that has no chat template (or none at all) no request is routed; the engine routed them all."""
    from transformers import AutoTokenizer

    from ngsd.risk.probe import shipped_probe_path
    from ngsd.vllm.risk import EngineRisk
    from ngsd.vllm.settings import GuardSettings

    tokenizer = AutoTokenizer.from_pretrained(_default_model())
    prompt = tokenizer("Write a poem about tea")["input_ids"]
    risk = EngineRisk(shipped_probe_path(), GuardSettings())
    assert not risk.checked(risk.first_verdict(-1e4, prompt), 0.0).routed  # no tokenizer given yet
    tokenizer.chat_template = None
    risk.use_tokenizer(tokenizer)
    verdict = risk.checked(risk.first_verdict(-1e4, prompt), 0.0)
    assert not verdict.routed and verdict.untemplated


# ---- found by stop 51's hunt: refused in the front end, where the worker's failure read "initialization failed"


def test_an_expert_that_does_not_fit_or_lacks_its_weights_is_refused_before_the_engine_starts(tmp_path):
    import json
    import shutil

    from transformers import LlamaConfig

    from ngsd.experts.shipped import shipped_expert_path

    tiny = tmp_path / "tiny-llama"
    LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tiny)
    for build in (engine_kwargs, serve_args):
        with pytest.raises(ValueError, match="ngsd expert '.*safety-lora' does not fit '.*tiny-llama': .*it was trained for"):
            build(str(tiny), expert="shipped", risk="off")
    half = tmp_path / "half-adapter"
    half.mkdir()
    shutil.copy(shipped_expert_path() / "adapter_config.json", half)
    with pytest.raises(FileNotFoundError, match="needs adapter_config.json and adapter_model.safetensors"):
        engine_kwargs(str(tiny), expert=str(half), risk="off")
    assert json.loads((half / "adapter_config.json").read_text())  # nothing written into the user's folder


def test_a_verdict_log_in_a_folder_that_is_not_there_is_refused(tmp_path):
    """Accepted, it killed the engine at the first request (FileNotFoundError in the worker), and every request
    after it failed with EngineDeadError."""
    for build in (engine_kwargs, serve_args):
        with pytest.raises(ValueError, match="verdict_log .*no-such-dir.* does not exist or cannot be written"):
            build(_default_model(), verdict_log=str(tmp_path / "no-such-dir" / "verdicts.jsonl"))
    engine_kwargs(_default_model(), verdict_log=str(tmp_path / "verdicts.jsonl"))


def test_a_mistyped_row_plan_does_not_read_as_an_expert_that_does_not_fit(monkeypatch):
    """The vLLM path merges the adapter and never reads NGSD_LORA_ROW_PLAN (a CPU benchmark's setting)."""
    monkeypatch.setenv("NGSD_LORA_ROW_PLAN", "pair")
    engine_kwargs(_default_model())


def test_hf_overrides_must_be_a_dict_and_one_processor_may_be_given_alone():
    with pytest.raises(TypeError, match="hf_overrides must be a dict with a guarded engine .* got function"):
        engine_kwargs("some/model", hf_overrides=lambda config: config)
    assert engine_kwargs("some/model", hf_overrides={"rope_theta": 1.0})["hf_overrides"]["rope_theta"] == 1.0
    assert engine_kwargs("some/model", logits_processors="pkg:Rule")["logits_processors"][1:] == ["pkg:Rule"]


def test_beam_search_steps_and_non_finite_logit_bias_are_refused_at_admission():
    """vLLM's beam search ranks beams by logprobs taken before the guard (its beams decoded unguarded, also on an
    engine that allows no opt-out); an infinite or NaN bias left the guard's step without a valid token (-1, which
    forced the vocabulary's last token)."""
    import math

    from vllm import SamplingParams

    from ngsd.vllm.settings import check_admission

    beam_step = SamplingParams(logprobs=2, max_tokens=1, temperature=0.0, detokenize=False)  # as BeamSearch builds it
    for extra_args in (None, {"ngsd_alpha": 1.0}, {"ngsd_guard": False}):
        beam_step.extra_args = extra_args
        with pytest.raises(ValueError, match="beam search is not supported on a guarded engine"):
            check_admission(beam_step)
    check_admission(SamplingParams(logprobs=2, max_tokens=1, temperature=0.0))  # a client's own one-token request
    check_admission(SamplingParams(logprobs=5, max_tokens=16, detokenize=False))
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match="logit_bias .* is \\+inf or NaN"):
            check_admission(SamplingParams(max_tokens=4, logit_bias={7: value}))
    check_admission(SamplingParams(max_tokens=4, logit_bias={7: 100.0, 8: -math.inf}))  # -inf: a mask


def test_the_vllm_front_end_warns_for_a_local_folder_with_other_weights(tmp_path):
    """The front end reads the local model folder's safetensors (a few rows of each matrix, no model load) and warns
    when the probe was trained on other weights of the same architecture (a fine-tune of its model)."""
    import json

    from ngsd.vllm.risk import model_config_of, probe_folder
    from ngsd.vllm.settings import GuardSettings
    from tests.conftest import tiny_model
    from tests.test_probe_weights import _caught, _lightly_fine_tuned, _probe_for

    trained_on = tiny_model("llama", seed=0)
    folder = _probe_for(trained_on, tmp_path / "probe")
    spec = json.loads((folder / "probe.json").read_text())
    spec["aggregate"], spec["pooling"] = "token_max", ["max"]  # the engine runs token_max probes only
    (folder / "probe.json").write_text(json.dumps(spec))
    trained_on.save_pretrained(tmp_path / "same")
    _lightly_fine_tuned(trained_on, "lora").save_pretrained(tmp_path / "tuned")
    settings = GuardSettings(risk="probe", probe=str(folder))
    assert not _caught(lambda: probe_folder(settings, model_config_of(str(tmp_path / "same"))))
    caught = _caught(lambda: probe_folder(settings, model_config_of(str(tmp_path / "tuned"))))
    assert len(caught) == 1 and str(tmp_path / "tuned") in str(caught[0].message)
