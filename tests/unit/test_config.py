"""JobConfig: defaults, TOML, CLI, precedence, errors with suggestions, round trip, --help."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from titan_aquila.config import parse as config_parse
from titan_aquila.config import JobConfig, help_text, load_job_config, print_help
from titan_aquila.errors import UserError
from titan_aquila.config.validate import job_model_args

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "x.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        load_job_config(argv)
    return str(e.value)


def test_defaults():
    cfg = load_job_config([])
    assert cfg == JobConfig()
    assert cfg.job.config_file is None and cfg.job.dump_folder == "./outputs"
    assert cfg.model.flavor == "debugmodel" and cfg.model.overrides == {}
    assert cfg.training.local_batch_size == 8 and cfg.training.global_batch_size == -1
    assert cfg.training.seq_len == 2048 and cfg.training.steps == 10000 and cfg.training.seed == 42
    assert cfg.training.dataset_path == [] and cfg.training.on_nonfinite == "stop"
    assert cfg.optimizer.lr == 8e-4 and cfg.optimizer.beta2 == 0.95 and cfg.optimizer.implementation == "foreach"
    assert cfg.lr_scheduler.warmup_steps == 200 and cfg.lr_scheduler.decay_ratio is None
    assert cfg.parallelism.data_parallel_shard_degree == -1 and cfg.parallelism.enable_sequence_parallel is True
    assert cfg.checkpoint.keep_latest_k == 2 and cfg.checkpoint.initial_load_model_only is True
    assert cfg.compile.components == ["model"] and cfg.float8.filter_fqns == ["output"]
    assert cfg.activation_checkpoint.mode == "none" and cfg.activation_checkpoint.selective_ac_option == "2"
    assert cfg.moe.load_balance_coeff == 1e-3 and cfg.moe.z_loss_coeff == 1e-2 and cfg.moe.z_loss_type == "router_lse"
    assert cfg.growth.methods == [] and cfg.growth.audit_steps == 4
    # mutable defaults are not shared between instances
    a, b = JobConfig(), JobConfig()
    a.training.dataset_path.append("x")
    assert b.training.dataset_path == []


def test_toml_loading(tmp_path):
    path = write(tmp_path, """
[job]
description = "stage 1"
[model]
flavor = "smollm2_135m"
[model.overrides]
n_layers = 4
rope_theta = 10000.0
[training]
steps = 30
max_norm = 2          # an int is accepted for a float
dataset_path = ["a.txt", "b.txt"]
[lr_scheduler]
decay_ratio = 0.2
decay_type = "cosine"
[checkpoint]
enable = true
[growth]
methods = ["aki_pro", "upcycle"]
""")
    cfg = load_job_config(["--job.config_file", path])
    assert cfg.job.config_file == path and cfg.job.description == "stage 1"
    assert cfg.model.flavor == "smollm2_135m" and cfg.model.overrides == {"n_layers": 4, "rope_theta": 10000.0}
    assert cfg.training.steps == 30 and cfg.training.max_norm == 2.0 and isinstance(cfg.training.max_norm, float)
    assert cfg.training.dataset_path == ["a.txt", "b.txt"]
    assert cfg.lr_scheduler.decay_ratio == 0.2 and cfg.lr_scheduler.decay_type == "cosine"
    assert cfg.checkpoint.enable is True and cfg.growth.methods == ["aki_pro", "upcycle"]
    assert cfg.training.seq_len == 2048  # untouched keys keep defaults


def test_cli_both_forms():
    cfg = load_job_config(["--training.steps", "12", "--optimizer.lr=3e-4", "--training.global_batch_size", "-1",
                           "--job.dump_folder=/tmp/o", "--training.seq_len=64"])
    assert cfg.training.steps == 12 and cfg.optimizer.lr == 3e-4 and cfg.training.global_batch_size == -1
    assert cfg.job.dump_folder == "/tmp/o" and cfg.training.seq_len == 64
    # a repeated option: the last one wins
    assert load_job_config(["--training.steps", "5", "--training.steps=7"]).training.steps == 7


def test_precedence_cli_over_toml_over_default(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 30\nseq_len = 128\n")
    cfg = load_job_config(["--training.steps", "40", "--job.config_file", path])  # order does not matter
    assert (cfg.training.steps, cfg.training.seq_len, cfg.training.local_batch_size) == (40, 128, 8)


def test_bool_flags(tmp_path):
    assert load_job_config(["--checkpoint.enable"]).checkpoint.enable is True
    assert load_job_config(["--checkpoint.enable=true"]).checkpoint.enable is True
    path = write(tmp_path, "[checkpoint]\nenable = true\n[metrics]\nenable_tensorboard = false\n")
    base = ["--job.config_file", path]
    assert load_job_config(base + ["--checkpoint.enable=false"]).checkpoint.enable is False
    assert load_job_config(base + ["--checkpoint.enable", "false"]).checkpoint.enable is False
    assert load_job_config(base + ["--no-checkpoint.enable"]).checkpoint.enable is False
    cfg = load_job_config(base + ["--metrics.enable_tensorboard", "--training.steps", "3"])
    assert cfg.metrics.enable_tensorboard is True and cfg.training.steps == 3
    assert error_of(["--checkpoint.enable=maybe"]) == "invalid value 'maybe' for '--checkpoint.enable': expected bool"
    assert error_of(["--no-training.steps"]).startswith("'--no-training.steps' only works for boolean options")


def test_lists_and_optional():
    cfg = load_job_config(["--growth.methods", "aki_pro,upcycle", "--compile.components=model, loss",
                           "--float8.filter_fqns", "", "--lr_scheduler.decay_ratio", "0.1"])
    assert cfg.growth.methods == ["aki_pro", "upcycle"] and cfg.compile.components == ["model", "loss"]
    assert cfg.float8.filter_fqns == [] and cfg.lr_scheduler.decay_ratio == 0.1
    assert load_job_config(["--lr_scheduler.decay_ratio", "none"]).lr_scheduler.decay_ratio is None
    assert load_job_config(["--checkpoint.initial_load_path", "ck/step-5"]).checkpoint.initial_load_path == "ck/step-5"
    assert load_job_config(["--checkpoint.initial_load_path=None"]).checkpoint.initial_load_path is None
    assert error_of(["--model.overrides", "n_layers=4"]) == (
        "option '--model.overrides' is a table and can only be set in a TOML file ([model.overrides])")


def test_unknown_key_toml_and_cli(tmp_path):
    path = write(tmp_path, "[training]\nstep = 3\n")
    assert error_of(["--job.config_file", path]) == f"unknown option 'training.step' in {path}; did you mean 'training.steps'?"
    assert error_of(["--training.stepz", "3"]) == (
        "unknown option '--training.stepz' on the command line; did you mean '--training.steps'?")
    # the right key name in the wrong section points to its section
    assert error_of(["--training.lr", "1"]) == "unknown option '--training.lr' on the command line; did you mean '--optimizer.lr'?"
    # a key before any [section]
    path = write(tmp_path, "steps = 3\n", "top.toml")
    assert error_of(["--job.config_file", path]) == f"unknown option 'steps' in {path}; did you mean 'training.steps'?"
    assert error_of(["--zzzz.qqqq", "1"]) == "unknown option '--zzzz.qqqq' on the command line; see --help for the valid options"
    assert error_of(["stray"]) == "unexpected argument 'stray'; options look like '--section.key value' (see --help)"
    assert error_of(["--training.steps"]) == "option '--training.steps' expects a value (int)"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[trainig]\nsteps = 3\n")
    assert error_of(["--job.config_file", path]) == f"unknown section '[trainig]' in {path}; did you mean '[training]'?"
    assert error_of(["--trainig.steps", "3"]) == (
        "unknown option '--trainig.steps' on the command line; did you mean '--training.steps'?")
    path = write(tmp_path, "training = 3\n", "notable.toml")
    assert error_of(["--job.config_file", path]) == f"'training' in {path} must be a table ([training]), got 3"


def test_wrong_type_cli_and_toml(tmp_path):
    assert error_of(["--training.steps", "abc"]) == "invalid value 'abc' for '--training.steps': expected int"
    assert error_of(["--training.steps", "1.5"]) == "invalid value '1.5' for '--training.steps': expected int"
    assert error_of(["--optimizer.lr", "fast"]) == "invalid value 'fast' for '--optimizer.lr': expected float"
    assert error_of(["--lr_scheduler.decay_ratio", "x"]) == (
        "invalid value 'x' for '--lr_scheduler.decay_ratio': expected float | None")
    cases = {
        '[training]\nsteps = "10"\n': "invalid value '10' for 'training.steps' in {p}: expected int",
        "[training]\nsteps = 1.5\n": "invalid value 1.5 for 'training.steps' in {p}: expected int",
        "[training]\nsteps = true\n": "invalid value true for 'training.steps' in {p}: expected int",
        "[checkpoint]\nenable = 1\n": "invalid value 1 for 'checkpoint.enable' in {p}: expected bool",
        '[growth]\nmethods = "aki_pro"\n': "invalid value 'aki_pro' for 'growth.methods' in {p}: expected list[str]",
        "[growth]\nmethods = [1]\n": "invalid value [1] for 'growth.methods' in {p}: expected list[str]",
        "[model]\noverrides = 3\n": "invalid value 3 for 'model.overrides' in {p}: expected dict, TOML table only",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = write(tmp_path, text, f"t{i}.toml")
        assert error_of(["--job.config_file", path]) == message.format(p=path)


def test_enum_values_with_suggestion(tmp_path):
    assert error_of(["--lr_scheduler.decay_type", "cosin"]) == (
        "invalid value 'cosin' for 'lr_scheduler.decay_type': expected one of 'linear', 'sqrt', 'cosine'; "
        "did you mean 'cosine'?")
    assert error_of(["--optimizer.name", "adamw"]) == (
        "invalid value 'adamw' for 'optimizer.name': expected one of 'AdamW'; did you mean 'AdamW'?")
    path = write(tmp_path, '[float8]\nrecipe_name = "rowwize"\n')
    assert error_of(["--job.config_file", path]) == (
        "invalid value 'rowwize' for 'float8.recipe_name': expected one of 'tensorwise', 'rowwise'; "
        "did you mean 'rowwise'?")
    path = write(tmp_path, '[moe]\nz_loss_type = "router_lse2"\n')
    assert error_of(["--job.config_file", path]) == (
        "invalid value 'router_lse2' for 'moe.z_loss_type': expected one of 'router_lse', 'router_max', "
        "'output_max'; did you mean 'router_lse'?")
    # [moe] options the model reads are set in [moe] only, and job_model_args copies them into ModelArgs
    cfg = load_job_config(["--moe.z_loss_type", "router_max", "--moe.capacity_factor", "1.5"])
    args = job_model_args(cfg)
    assert (args.z_loss_type, args.capacity_factor) == ("router_max", 1.5)
    cfg.model.overrides = {"z_loss_type": "router_lse"}
    with pytest.raises(UserError, match=r"^set z_loss_type in \[moe\], not in \[model.overrides\]$"):
        job_model_args(cfg)
    assert error_of(["--training.autocast_dtype", "float16"]) == (
        "invalid value 'float16' for 'training.autocast_dtype': expected one of '', 'bfloat16'; did you mean 'bfloat16'?")
    assert error_of(["--compile.components", "model,los"]) == (
        "invalid value 'los' in 'compile.components': expected 'model' or 'loss'; did you mean 'loss'?")
    assert load_job_config(["--training.autocast_dtype", "bfloat16"]).training.autocast_dtype == "bfloat16"


def test_validate_ranges():
    assert error_of(["--training.steps", "-1"]) == "training.steps must be >= 0, got -1"
    assert error_of(["--optimizer.lr", "-1e-3"]) == "optimizer.lr must be finite and >= 0, got -0.001"
    # several violations are reported together on one line
    assert error_of(["--training.seq_len", "0", "--metrics.log_freq", "0", "--lr_scheduler.warmup_steps", "-1"]) == (
        "training.seq_len must be >= 1, got 0; lr_scheduler.warmup_steps must be >= 0, got -1; "
        "metrics.log_freq must be >= 1, got 0")
    assert error_of(["--lr_scheduler.decay_ratio", "1.5"]) == "lr_scheduler.decay_ratio must be none or in (0, 1], got 1.5"
    assert error_of(["--training.global_batch_size", "12"]) == (
        "training.global_batch_size must be a multiple of training.local_batch_size (8), got 12")
    assert error_of(["--parallelism.data_parallel_shard_degree", "0"]) == (
        "parallelism.data_parallel_shard_degree must be -1 or >= 1, got 0")
    assert error_of(["--activation_checkpoint.selective_ac_option", "op"]) == (
        "activation_checkpoint.selective_ac_option must be a positive integer such as '2' (op-level 'op' is not "
        "implemented), got 'op'")
    assert error_of(["--growth.enable", "--growth.methods", "upcycle"]) == (
        "growth.source_path must be set when growth.enable is true, got None")
    cfg = load_job_config(["--training.global_batch_size", "32", "--training.max_norm", "inf",
                           "--activation_checkpoint.selective_ac_option", "3", "--growth.enable",
                           "--growth.source_path", "ck", "--growth.methods", "upcycle"])
    assert cfg.training.global_batch_size == 32 and math.isinf(cfg.training.max_norm)
    # validate() also catches values set in code with a wrong type
    cfg = JobConfig()
    cfg.training.steps = "10"
    with pytest.raises(UserError, match=r"^invalid value '10' for 'training.steps': expected int$"):
        cfg.validate()


def test_missing_and_malformed_file(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert error_of(["--job.config_file", missing]) == f"config file not found: {missing}"
    path = write(tmp_path, "[training]\nsteps = = 3\n")
    assert error_of(["--job.config_file", path]) == f"malformed TOML in {path}: Invalid value (at line 2, column 9)"


def test_to_dict_from_dict_round_trip(tmp_path):
    path = write(tmp_path, "[model.overrides]\nn_layers = 4\n")
    cfg = load_job_config(["--job.config_file", path, "--growth.methods", "aki_pro,upcycle",
                           "--lr_scheduler.decay_ratio", "0.25", "--checkpoint.enable"])
    d = json.loads(json.dumps(cfg.to_dict()))  # survives JSON
    assert d["growth"]["methods"] == ["aki_pro", "upcycle"] and d["model"]["overrides"] == {"n_layers": 4}
    assert d["lr_scheduler"]["decay_ratio"] == 0.25 and d["job"]["config_file"] == path
    back = JobConfig.from_dict(d)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert back.model.overrides is not cfg.model.overrides  # a copy, not shared state
    assert JobConfig.from_dict({"training": {"steps": 3}}).training.steps == 3
    with pytest.raises(UserError, match=r"^unknown option 'training.stepz' in the config dict; did you mean 'training.steps'\?$"):
        JobConfig.from_dict({"training": {"stepz": 3}})
    assert JobConfig.from_dict({"training": {"stepz": 3, "steps": 4}, "old": {}}, strict=False).training.steps == 4


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        load_job_config(["--training.steps", "3", "--help"], prog="train.py")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == help_text("train.py")
    assert out.startswith("usage: train.py [--job.config_file FILE]")
    lines = out.splitlines()
    for section in dataclasses.fields(JobConfig):
        assert any(line.startswith(f"[{section.name}]  ") for line in lines), section.name
        for f in dataclasses.fields(section.default_factory):
            doc = config_parse.attribute_docs(section.default_factory)[f.name]
            assert len(doc) > 10, f.name
            assert sum(line.startswith(f"  --{section.name}.{f.name} (") and line.endswith(doc) for line in lines) == 1
    assert ("  --training.steps (int, default 10000): Number of optimizer steps to train for. 0: build, load or grow "
            "(and audit), save, stop: no optimizer step, so no gradients or AdamW moments are ever allocated (a growth "
            "run for a model too big to train here).") in lines
    assert ("  --lr_scheduler.decay_type (linear|sqrt|cosine, default \"linear\"): "
            "Shape of the decay from lr down to the floor.") in lines
    assert ("  --lr_scheduler.decay_ratio (float | None, default none): None = decay over all steps after warmup; "
            "a value in (0, 1] = warmup-stable-decay (WSD): hold lr, then decay over the last decay_ratio × "
            "training.steps steps.") in lines
    assert "  --checkpoint.enable (bool, default false): Save checkpoints during training and resume from the latest one in folder." in lines
    assert '  --compile.components (list[str], default ["model"]): What to compile: \'model\' (each transformer block) and/or \'loss\'.' in lines
    assert any(line.startswith("  --model.overrides (dict, TOML table only, default {}): ") for line in lines)
    n_options = sum(len(dataclasses.fields(s.default_factory)) for s in dataclasses.fields(JobConfig))
    assert sum(line.startswith("  --") for line in lines) == n_options == 91
    print_help("p")
    assert capsys.readouterr().out == help_text("p")


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titan_aquila.config", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_module_entry_point_error_and_help():
    r = _run_module("--training.stepz", "3")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "error: unknown option '--training.stepz' on the command line; did you mean '--training.steps'?"]
    assert "Traceback" not in r.stderr
    r = _run_module("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: python -m titan_aquila.config ") and "  --growth.audit_steps (int, default 4): " in r.stdout
    r = _run_module("--training.steps=7")
    assert r.returncode == 0 and json.loads(r.stdout)["training"]["steps"] == 7
