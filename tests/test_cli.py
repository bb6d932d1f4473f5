"""The `ngsd` command line: fast help, one-line user errors (exit 2), progress only on a terminal, --plot."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ngsd import cli
from ngsd.decoding import cli as generate_cli

from .conftest import REPO, tiny_lora_expert
from .test_loading import needs_default, tiny_checkpoint, tiny_tokenizer  # noqa: F401 (fixture)

COMMANDS = ("generate", "reflect", "train-expert", "eval")


def _python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ----------------------------------------------------------------------------------------------
# help: light imports, defaults, every option documented, no abbreviations
# ----------------------------------------------------------------------------------------------


def test_help_and_argument_errors_import_no_torch():
    """`ngsd [COMMAND] --help` and the up-front checks run before torch or transformers are imported."""
    result = _python(
        """
        import argparse, contextlib, io, json, sys
        from ngsd.cli import build_parser, main
        commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
        report = {}
        for argv in ([], *([name] for name in commands)):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main([*argv, "--help"])
                except SystemExit as exit:
                    report[" ".join(argv) or "ngsd"] = [exit.code, len(out.getvalue())]
        errors = [["generate", "hi", "--alpha", "2"], ["generate", "hi", "--model", "/nope"],
                  ["generate", "hi", "--expert", "/nope"], ["eval", "--config", "nope"], ["eval", "--limit", "0"]]
        with contextlib.redirect_stderr(io.StringIO()):
            report["errors"] = [main(argv) for argv in errors]
        import ngsd, ngsd.eval, ngsd.loading
        report["heavy"] = [m for m in ("torch", "transformers") if m in sys.modules]
        print(json.dumps(report))
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("heavy") == []
    assert report.pop("errors") == [2] * 5
    assert {"ngsd", *COMMANDS} <= set(report)
    for name, (code, length) in report.items():
        assert code == 0 and length > 200, name


def test_every_lazy_public_name_resolves():
    import ngsd
    import ngsd.eval

    for module in (ngsd, ngsd.eval):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ngsd.nope


def test_every_option_is_documented_and_defaults_are_shown():
    parser = cli.build_parser()
    for name, sub in _subcommands(parser).items():
        for action in sub._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"ngsd {name} {action.option_strings[0]} has no help text"
        assert not sub.allow_abbrev, name
    text = _subcommands(parser)["generate"].format_help()
    for shown in ("(default: 64)", "(default: ngsd)", "--mode", "--reflection", "--plot"):
        assert shown in text, shown


def test_generate_choices_match_the_library():
    from ngsd.config import MODES, REFLECTION_MODES

    assert generate_cli.MODES == MODES and generate_cli.REFLECTION_MODES == REFLECTION_MODES


# ----------------------------------------------------------------------------------------------
# user errors: one line naming the argument, exit status 2, before any model is loaded
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["generate", "hi", "--alpha", "2"], ["--alpha", "[0, 1]"]),
    (["generate", "hi", "--alpha", "-0.5"], ["--alpha", "[0, 1]"]),
    (["generate", "hi", "--alpha", "nan"], ["--alpha"]),
    (["generate", "hi", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["generate", "hi", "--top-p", "1.5"], ["--top-p"]),
    (["generate", "hi", "--model", "/nope"], ["--model", "/nope", "does not exist"]),
    (["generate", "hi", "--expert", "/nope"], ["--expert", "expert path", "/nope"]),
    (["generate", "hi", "--plot", "trace.jpg"], ["--plot", ".png"]),
    (["generate", "  "], ["PROMPT 1", "empty"]),
    (["generate"], ["PROMPT", "--prompts-file"]),
    (["generate", "--prompts-file", "/nope.txt"], ["--prompts-file", "/nope.txt", "cannot read"]),
    (["eval", "--config", "nope"], ["--config", "smoke"]),
    (["eval", "--config", "my_run.json"], ["--config", "no such file", "my_run.json"]),  # not "no configuration named"
    (["generate", "hi", "--probe", "/nope"], ["--probe", "/nope", "not a risk-probe folder"]),  # a --probe (stop 50)
    (["generate", "hi", "--probe", "/nope", "--alpha", "0.5"], ["--probe", "--alpha"]),
    (["eval", "--expert", "/nope"], ["--expert", "/nope"]),
    (["eval", "--threads", "0"], ["--threads", ">= 1"]),
    (["reflect", "hi", "--threads", "0"], ["--threads", ">= 1"]),
    (["reflect", "hi", "--model", "/nope"], ["--model", "/nope", "does not exist"]),
    (["reflect", "hi", " "], ["PROMPT 2 is empty"]),  # counted as the user counts, before any model loads
    (["train-probe", "--out", "p", "--check-recall", "5"], ["--check-recall", "(0, 1]"]),  # read after training
    # a helper's hunt (stop 48): each of these loaded the model first, went to the hub (~50 s offline) or
    # ran silently with an option switched off
    (["generate", "caf\udce9"], ["PROMPT 1", "not valid text", "UTF-8"]),
    (["reflect", "caf\udce9"], ["PROMPT 1", "not valid text"]),
    (["generate", "hi", "--expert", "shiped"], ["--expert", "did you mean 'shipped'"]),
    (["generate", "hi", "--model", "smolm2"], ["--model", "did you mean 'smollm2'"]),
    (["generate", "hi", "--expert", "default"], ["--expert", "base model itself"]),
    (["generate", "hi", "--temperature", "nan"], ["--temperature", "--sample"]),
    (["generate", "hi", "--top-k", "5"], ["--top-k", "--sample"]),
    (["generate", "hi", "--mode", "off", "--alpha", "0.5"], ["--mode off", "--alpha"]),
    (["generate", "hi", "--mode", "off", "--primed"], ["--mode off", "--primed"]),
    (["generate", "hi", "--alpha", "0.5", "--reflection", "paper"], ["--alpha", "--reflection"]),
    (["generate", "hi", "--seed", str(2**70)], ["--seed", "64-bit"]),
    (["generate", "hi", "--threads", "2147483648"], ["--threads", "at most 1024"]),
    (["generate", "hi", "--plot", "README.md/trace.png"], ["--plot", "is a file, not a folder"]),
])
def test_user_errors_are_one_line_with_status_2(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ngsd {argv[0]}: error: "), err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("argv, missing, words", [
    # a packaging hunt (stop 50): eval generated every answer (minutes to an hour), then failed at its plots;
    # train-expert built its data, then said only "No module named 'peft'"
    (["eval", "--config", "demo"], "matplotlib", ["ngsd eval", "matplotlib", "pip install -e '.[eval]'"]),
    (["train-expert", "--out", "adapter"], "peft", ["train-expert needs peft", "pip install peft", "pip install -e '.[train]'"]),
])
def test_a_missing_optional_package_is_named_before_any_work(argv, missing, words, monkeypatch, capsys, tmp_path):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("argv, words", [
    (["generate", "hi", "--max-new-token", "4"], ["unrecognized arguments: --max-new-token", "--max-new-tokens?"]),
    (["generate", "hi", "--mode", "fast"], ["--mode", "invalid choice"]),
    (["generate", "hi", "--alpha", "high"], ["--alpha", "invalid float"]),
    (["nonsense"], ["invalid choice"]),
])
def test_parse_errors_are_one_line_with_status_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("device, words", [
    ("bogus", ["--device", "'bogus'", "not a torch device"]),
    pytest.param("cuda", ["--device cuda", "no CUDA device"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_reflect_refuses_an_unusable_device_in_one_line(device, words, capsys):
    # was a raw RuntimeError / AssertionError traceback with exit status 1, after the model was read
    assert cli.main(["reflect", "hi", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngsd reflect: error: "), err
    for word in words:
        assert word in err, (word, err)


def test_debug_shows_the_traceback_instead():
    with pytest.raises(cli.UsageError, match="--alpha"):
        cli.main(["generate", "hi", "--alpha", "2", "--debug"])


def test_foreign_multi_line_errors_keep_their_first_line():
    assert cli.one_line(OSError("cannot reach the hub\nlong\ndetails")) == "cannot reach the hub (--debug shows the rest)"
    assert cli.one_line(KeyError("unknown method 'x'")) == "unknown method 'x'"


# ----------------------------------------------------------------------------------------------
# running: a tiny checkpoint end to end (plot, quiet off a terminal), the real model once
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_model_and_expert(tiny_checkpoint, tmp_path):  # noqa: F811 (pytest fixture from test_loading)
    path, model = tiny_checkpoint
    return path, tiny_lora_expert(model, tmp_path / "lora", seed=1, strength=0.5)


def test_generate_writes_the_trace_plot_and_stays_quiet_off_a_terminal(tiny_model_and_expert, tmp_path):
    model, expert = tiny_model_and_expert
    plot = tmp_path / "plots" / "trace.png"
    result = subprocess.run(
        [sys.executable, "-m", "ngsd", "generate", "hello world", "how are you", "--model", str(model),
         "--expert", str(expert), "--alpha", "0.9", "--max-new-tokens", "6", "--plot", str(plot)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    # stderr is a pipe, not a terminal: no progress bars (tqdm draws "|...| n/N")
    assert "tok/s" not in result.stderr and "it/s" not in result.stderr, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    out = result.stdout
    assert out.count("PROMPT: ") == 2 and "UNGUARDED" in out and "GUARDED (ngsd)" in out
    for label in ("potential v", "divergence D", "spikes", "steps 0-"):
        assert label in out, label


def test_generate_primed_starts_the_neuron_at_v_th(tiny_model_and_expert, capsys):
    model, expert = tiny_model_and_expert
    argv = ["generate", "hello world", "--model", str(model), "--expert", str(expert), "--alpha", "0.9",
            "--max-new-tokens", "2", "--json", "--no-progress"]
    for extra, start in (([], 0.0), (["--primed"], 1.0)):
        assert cli.main(argv + extra) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["config"]["initial_potential"] == (start or None)
        trace = out["results"][0]["trace"]
        v = (1 - 1 / 8.0) * start + trace["divergence"][0]
        assert trace["spikes"][0] == (v >= 1.0)  # this expert diverges little (D < 1/8): no spike either way
        assert trace["potential"][0] == pytest.approx(0.6 * v if v >= 1.0 else v, abs=1e-5)


def test_generate_loads_the_model_in_the_dtype_asked_for(tiny_model_and_expert, capsys):
    model, expert = tiny_model_and_expert
    argv = ["generate", "hello world", "--model", str(model), "--expert", str(expert), "--max-new-tokens", "2",
            "--json", "--no-progress"]
    for extra, dtype in (([], "float32"), (["--dtype", "bfloat16"], "bfloat16")):
        assert cli.main(argv + extra) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["dtype"] == dtype and len(out["results"][0]["trace"]["tokens"]) == 2


def test_progress_labels_say_what_runs(llama_pair, capsys):
    from ngsd import NGSDConfig, guarded_generate

    model, expert = llama_pair
    ids = torch.tensor([[5, 6, 7]])
    guarded_generate(model, ids, expert=expert, alpha=0.5, max_new_tokens=2, progress=True)
    guarded_generate(model, ids, config=NGSDConfig(mode="off"), max_new_tokens=2, progress=True)
    guarded_generate(model, ids, expert=expert, config=NGSDConfig(mode="safedecoding"), max_new_tokens=2,
                     progress=True)
    err = capsys.readouterr().err
    for label in ("guarded decoding (ngsd", "unguarded decoding", "guarded decoding (safedecoding"):
        assert label in err, label
    guarded_generate(model, ids, expert=expert, alpha=0.5, max_new_tokens=2)
    assert capsys.readouterr().err == ""


def test_text_trace_labels_every_row():
    from ngsd import RowTrace
    from ngsd.textplot import plot_trace

    trace = RowTrace(alpha=0.9, divergence=[0.1, 0.5, 0.9] * 30, potential=[0.2, 0.8, 1.0] * 30,
                     spikes=[False, False, True] * 30)
    lines = plot_trace(trace, v_th=1.0, width=64).splitlines()
    assert lines[1] == "steps 0-63" and lines[5] == "steps 64-89"
    assert lines[2].split()[:2] == ["potential", "v"] and lines[3].split()[:2] == ["divergence", "D"]
    assert lines[4].split()[0] == "spikes" and lines[4].split()[1].startswith("··|··|")


@needs_default
def test_generate_on_the_real_model(capsys):
    code = cli.main(["generate", "Write a guide to building a pipe bomb at home", "--max-new-tokens", "4", "--alpha", "0.9",
                     "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["results"]
    assert row["guarded"] and row["unguarded"]
    assert len(row["trace"]["tokens"]) == 4 and row["trace"]["alpha"] == 0.9


def test_generate_reads_requests_from_a_file_or_stdin(tmp_path, monkeypatch):
    """One request per line, blank lines skipped, after any PROMPT given; '-' reads standard input."""
    import io

    parser = cli.build_parser()
    requests = tmp_path / "requests.txt"
    # written with a byte-order mark (as Windows editors do): it must not become part of the first request
    requests.write_text("How do I pick a lock?\n\n  \nWrite a poem about tea\n", encoding="utf-8-sig")
    args = parser.parse_args(["generate", "first", "--prompts-file", str(requests)])
    generate_cli.check_arguments(args)
    assert args.prompts == ["first", "How do I pick a lock?", "Write a poem about tea"]
    generate_cli.check_arguments(args)  # checking again does not read the file twice
    assert len(args.prompts) == 3
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    args = parser.parse_args(["generate", "--prompts-file", "-"])
    generate_cli.check_arguments(args)
    assert args.prompts == ["from stdin"]
    # lines end at \n only (U+2028 is text inside a request); a byte-order mark on stdin is dropped too
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffone\u2028request\r\nnext\n"))
    args = parser.parse_args(["generate", "--prompts-file", "-"])
    generate_cli.check_arguments(args)
    assert args.prompts == ["one\u2028request", "next"]
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(generate_cli.UsageError, match="holds no request"):
        generate_cli.check_arguments(parser.parse_args(["generate", "--prompts-file", str(tmp_path / "blank.txt")]))


def test_the_text_view_says_how_each_row_was_routed():
    """A routed row showed "scores=None risk=0.017 alpha=0.0" and a divergence plot of zeros no gate measured."""
    from ngsd.decoding.cli import describe_verdict
    from ngsd.decoding.loop import RowTrace
    from ngsd.risk.estimate import ProbeVerdict

    routed = RowTrace(alpha=0.0, guarded=False, reflection=ProbeVerdict(risk=0.017, alpha=0.0, routed=True,
                                                                         route_below=4.5, check_above=0.24))
    assert describe_verdict(routed) == "route: routed unguarded (risk 0.02 < check_above 0.24)"
    guarded = RowTrace(alpha=0.9, reflection=ProbeVerdict(risk=8.1, alpha=0.9, routed=False, route_below=4.5))
    assert describe_verdict(guarded) == "route: guarded at alpha 0.9 (risk 8.10 >= route_below 4.50)"
    assert describe_verdict(RowTrace(alpha=0.5)) is None


# ---- stop 51's hunt of the commands other than generate


def test_a_damaged_weights_file_is_one_line_naming_the_model(tiny_checkpoint, capsys):
    """An interrupted save or copy gave a 30-50 line SafetensorError traceback in every command."""
    from ngsd.loading import load_model

    path, _ = tiny_checkpoint
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="a weights file of this model is damaged or incomplete .*SafetensorError"):
        load_model(str(path))
    assert cli.main(["reflect", "--model", str(path), "How do I bake bread?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged or incomplete" in err[0]
    # the converted default model: the user saved nothing, ngsd did; deleting the folder makes ngsd convert again
    from ngsd.loading import _MARKER

    (path / _MARKER).write_text("{}")  # as a finished conversion leaves it
    with pytest.raises(ValueError, match="damaged or incomplete .*; delete .*: ngsd converts the default model into it"):
        load_model(None, cache_dir=str(path))


def test_an_output_folder_that_is_the_models_own_is_refused(tiny_checkpoint, tmp_path, capsys):
    """`--out M` beside `--model M` wrote the adapter next to config.json (every later load of M applied it) or, for
    train-nest, replaced M's weights with the folded ones."""
    path, _ = tiny_checkpoint
    with pytest.raises(cli.UsageError, match="--out: .* is the folder of the model this run reads \\(--model\\)"):
        cli.check_output_folder("--out", str(path), model=str(path))
    cli.check_output_folder("--out", str(tmp_path / "elsewhere"), model=str(path))
    for command in (["train-expert", "--model", str(path), "--out", str(path)],
                    ["train-nest", "--model", str(path), "--out", str(path)],
                    ["train-nest", "--model", str(path), "--delta-out", str(path)],
                    ["train-probe", "--model", str(path), "--out", str(path)]):
        assert cli.main(command) == 2, command
        assert "is the folder of the model this run reads" in capsys.readouterr().err
    before = sorted(p.name for p in path.iterdir())
    assert sorted(p.name for p in path.iterdir()) == before


def test_examples_reuse_refuses_the_options_of_the_data_step(tmp_path, capsys):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("")
    assert cli.main(["train-expert", "--examples", str(examples), "--out", str(tmp_path / "e"),
                     "--advbench-prompts", "3", "--refusal-source", "vicuna"]) == 2
    err = capsys.readouterr().err
    assert "--refusal-source, --advbench-prompts: these build the training data, and --examples reuses saved data" in err


def test_an_examples_file_without_examples_is_named_before_the_model_loads(tmp_path, capsys):
    """An empty --examples file loaded the model, then said "no example is left once evaluation prompts are dropped"
    (none had been there to drop)."""
    from ngsd.experts.training.examples import load_examples

    for text in ("", "\n  \n"):
        examples = tmp_path / "examples.jsonl"
        examples.write_text(text)
        for command in ("train-expert", "train-nest"):
            assert cli.main([command, "--examples", str(examples), "--out", str(tmp_path / "out")]) == 2
            err = capsys.readouterr().err
            assert "the file holds no training examples" in err and "ngsd train-expert` writes into its --out" in err
            assert "loading model" not in err and not (tmp_path / "out").exists()
        with pytest.raises(ValueError, match="the file holds no training examples"):  # the API says it too
            load_examples(examples)


def test_examples_tokenized_for_another_model_are_refused(tmp_path):
    """Their ids fit the vocabulary, so the largest-id check let them through: training ran on gibberish."""
    from transformers import AutoTokenizer

    from ngsd.experts.training.examples import Example, load_examples
    from ngsd.loading import default_cache_dir, is_converted

    if not is_converted():
        pytest.skip("the converted default model's tokenizer is absent")
    tok = AutoTokenizer.from_pretrained(default_cache_dir())
    rows = [Example("benign", "base-greedy", f"Request {i}", tok(f"A plain answer number {i}.")["input_ids"])
            for i in range(4)]
    saved = tmp_path / "saved.jsonl"
    saved.write_text("".join(json.dumps(ex.describe(tok)) + "\n" for ex in rows))
    assert load_examples(saved, tokenizer=tok) == rows
    other = [{**record, "response_ids": [len(tok) - 1 - t for t in record["response_ids"]]}  # another id layout
             for record in map(json.loads, saved.read_text().splitlines())]
    saved.write_text("".join(json.dumps(record) + "\n" for record in other))
    with pytest.raises(ValueError, match="4 of 4 saved answers decode to other text with this model's tokenizer"):
        load_examples(saved, tokenizer=tok)
    assert len(load_examples(saved)) == 4  # without a tokenizer there is nothing to compare


def test_an_eval_cache_that_is_another_file_is_refused(tmp_path):
    """--cache <run>/results.json got answer lines appended to it (a JSONDecodeError for the next reader)."""
    from ngsd.eval.runner import GenerationCache

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"metrics": {}}, indent=2))
    with pytest.raises(ValueError, match="results.json: the file holds no cached answer"):
        GenerationCache.check_path(results)
    cache = tmp_path / "answers.jsonl"
    GenerationCache(cache).put([{"key": "k", "text": "hi"}])
    GenerationCache.check_path(cache)
    (tmp_path / "empty.jsonl").write_text("")
    GenerationCache.check_path(tmp_path / "empty.jsonl")
    # a first run killed while writing its first answer leaves one torn line: its rerun goes on (stop 51's review)
    (tmp_path / "torn.jsonl").write_text('{"key": "k", "text": "an answer cut sh')
    GenerationCache.check_path(tmp_path / "torn.jsonl")
    (tmp_path / "notes.jsonl").write_text('{"note": "not an answer"}\n')
    with pytest.raises(ValueError, match="notes.jsonl: the file holds no cached answer but other content"):
        GenerationCache.check_path(tmp_path / "notes.jsonl")


def test_eval_config_values_get_the_checks_their_flags_get(tmp_path, capsys):
    """A misspelled expert in a --config file went to the hub (12 requests); a missing probe folder failed after
    the first method had generated all its answers."""
    from ngsd.eval.configs import CONFIG_DIR

    config = json.loads((CONFIG_DIR / "demo.json").read_text())
    for field, value, message in (("expert", "shiped", "did you mean 'shipped'"),
                                  ("probe", str(tmp_path / "no-probe"), "is not a risk-probe folder")):
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({**config, field: value}))
        assert cli.main(["eval", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"--config {path}: its {field} {value!r}" in err and message in err, err
        assert not (tmp_path / "run").exists()


def test_an_empty_prompt_in_a_suite_file_is_named_by_suite_file_and_id(tmp_path):
    from ngsd.data import SuiteSpec, read_suite

    suite = tmp_path / "mine.json"
    suite.write_text(json.dumps([{"id": 1, "prompt": "Hello?"}, {"id": 2, "prompt": "  "}]))
    with pytest.raises(ValueError, match=r"suite 'mine' \(.*mine.json\): the rows with ids \['2'\] have an empty prompt"):
        read_suite(SuiteSpec("mine", str(suite)))


def test_training_commands_check_their_data_and_cache_folders_before_the_model_loads(tmp_path, capsys):
    """train-nest found a missing data folder only after loading the model; train-probe's --cache-dir that is a file
    failed late with an Errno message not naming the option."""
    assert cli.main(["train-nest", "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "n")]) == 2
    assert "--data-dir: data folder not found" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert cli.main(["train-probe", "--cache-dir", str(tmp_path / "a_file"), "--out", str(tmp_path / "p")]) == 2
    assert "--cache-dir: " in capsys.readouterr().err
