"""gin plumbing (`gin_config`), every gin file of the repository, and the `summary` CLI."""

import json
import os
import pathlib
import subprocess
import sys

import gin
import jax
import pytest
from flax import nnx

from spectron_jax import cli, gin_config

REPO = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = REPO / "gin"
OWN_GIN_DIRS = ("models", "encoders", "objectives")
COMPONENTS = ("encoder", "projection", "decoder", "prenet", "postnet", "stop_head")


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _summary(*args, cwd=REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spectron_jax.summary", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- flags and parsing --------------------------------------------------------------------------------
def test_split_gin_bindings():
    bindings, rest = gin_config.split_gin_bindings(
        ["--gin_file=a.gin", "--gin.MODEL_DIR='/tmp/x'", "--json", "--gin.DecoderConfig.num_layers", "3",
         "--gin.X=a=b"])
    assert bindings == ["MODEL_DIR = '/tmp/x'", "DecoderConfig.num_layers = 3", "X = a=b"]
    assert rest == ["--gin_file=a.gin", "--json"]
    for bad in (["--gin.=3"], ["--gin.X="], ["--gin.X"], ["--gin.X", "--json"], ["--gin.a b=1"]):
        with pytest.raises(cli.UsageError, match="--gin"):
            gin_config.split_gin_bindings(bad)


def _parse(argv):
    parser = gin_config.add_gin_flags(cli.ArgumentParser(prog="test"))
    args = gin_config.parse_args(parser, argv)
    gin_config.parse_gin(args)
    return args


def test_files_then_bindings_later_ones_win(tmp_path):
    override = tmp_path / "override.gin"
    override.write_text("DecoderConfig.num_layers = 5\nDecoderConfig.model_dim = 96\n")
    _parse(["--gin_file=models/tiny.gin", f"--gin_file={override}", "--gin.DecoderConfig.model_dim=160",
            "--gin.SpectronConfig.max_time_delta_order=2"])
    config = gin_config.build("SpectronConfig")
    assert config.decoder.num_layers == 5  # the later file
    assert config.decoder.model_dim == 160  # the binding, after every file
    assert config.max_time_delta_order == 2
    assert config.decoder.vocab_size == 512 and config.encoder.model_dim == 64  # tiny.gin


def test_search_paths_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("gin/models/tiny.gin", "models/tiny.gin", str(GIN_DIR / "models" / "tiny.gin")):
        _parse([f"--gin_file={name}"])
        assert gin_config.build("SpectronConfig").decoder.vocab_size == 512
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "mine.gin").write_text("include 'models/tiny.gin'\nDecoderConfig.num_layers = 1\n")
    _parse(["--gin_file=mine.gin", f"--gin_search_paths={extra}"])
    assert gin_config.build("SpectronConfig").decoder.num_layers == 1
    # a folder named like a gin subfolder in the working directory (and importable as a namespace
    # package) must not derail the search
    (tmp_path / "models").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    _parse(["--gin_file=models/tiny.gin"])
    assert gin_config.build("SpectronConfig").decoder.vocab_size == 512
    with pytest.raises(cli.UsageError, match="--gin_search_paths"):
        _parse(["--gin_file=mine.gin", f"--gin_search_paths={tmp_path / 'missing'}"])


@pytest.mark.parametrize("text, argv, expected", [
    (None, ["--gin_file=models/nope.gin"], r"--gin_file=models/nope.gin: file not found"),
    ("include 'models/absent.gin'\n", [], r"--gin_file=.*bad.gin: Unable to open file: models/absent.gin"),
    ("NoSuchConfig.x = 1\n", [], r"--gin_file=.*bad.gin: No configurable matching 'NoSuchConfig'"),
    ("DecoderConfig.model_dim = (\n", [], r"--gin_file=.*bad.gin"),
    ("", ["--gin.DecoderConfig.bogus=1"], r"--gin.DecoderConfig.bogus=1: .*doesn't have a parameter named 'bogus'"),
    ("", ["--gin.DecoderConfig.model_dim=(1"], r"--gin.DecoderConfig.model_dim=\(1: the value is not a valid"),
    ("CKPT = %gin.REQUIRED\nPretrainedInit.lm_checkpoint = %CKPT\n", [],
     r"CKPT is %gin.REQUIRED and was not set \(add --gin.CKPT=VALUE\)"),
    ("PretrainedInit.lm_checkpoint = %UNDEFINED\n", [], r"No bindings specified for 'UNDEFINED"),
])
def test_gin_errors_are_one_line_usage_errors(tmp_path, text, argv, expected):
    if text is not None:
        bad = tmp_path / "bad.gin"
        bad.write_text(text)
        argv = [f"--gin_file={bad}"] + argv
    with pytest.raises(cli.UsageError, match=expected) as info:
        _parse(argv)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_required_macro_can_be_set_on_the_command_line(tmp_path):
    path = tmp_path / "req.gin"
    path.write_text("CKPT = %gin.REQUIRED\nSpectronConfig.pretrained = @PretrainedInit()\n"
                    "PretrainedInit.lm_checkpoint = %CKPT\n")
    _parse([f"--gin_file={path}", "--gin.CKPT='/ckpt/lm'"])
    assert gin_config.build("SpectronConfig").pretrained.lm_checkpoint == "/ckpt/lm"
    assert gin_config.query_macro("CKPT") == "/ckpt/lm"
    assert gin_config.query_macro("ABSENT", default=7) == 7
    with pytest.raises(cli.UsageError, match="ABSENT"):
        gin_config.query_macro("ABSENT")


def test_registration_is_idempotent_and_builds_plain_instances():
    first = gin_config.register_configurables()
    second = gin_config.register_configurables()
    assert first.keys() == second.keys() >= {"SpectronConfig", "ConformerConfig", "DecoderConfig", "AcousticConfig",
                                             "LossWeights", "MeshConfig", "TaskConfig", "SpecAugmentConfig"}
    from spectron_jax.models.spectron import SpectronConfig

    gin_config.parse_gin(gin_files=[], bindings=[])
    built = gin_config.build("SpectronConfig")
    assert type(built) is SpectronConfig and built == SpectronConfig()
    # the partitioning constants resolve by short and by module-qualified name
    from spectron_jax import partitioning

    gin_config.parse_gin(gin_files=[], bindings=["TaskConfig.augment_splits = %MESH_AXES"])
    assert gin_config.build("TaskConfig").augment_splits == partitioning.MESH_AXES
    assert gin.query_parameter("partitioning.DEFAULT_RULES") == partitioning.DEFAULT_RULES


def test_operative_config_round_trips(tmp_path):
    _parse(["--gin_file=models/tiny.gin", "--gin_file=objectives/no_text_ce.gin"])
    fallback = pathlib.Path(gin_config.write_operative_config(str(tmp_path / "before")))
    assert "Nothing was built" in fallback.read_text() and "DecoderConfig.vocab_size = 512" in fallback.read_text()
    config = gin_config.build("SpectronConfig")
    path = pathlib.Path(gin_config.write_operative_config(str(tmp_path / "run")))
    assert path.name == "config.gin"
    text = path.read_text()
    assert "DecoderConfig.vocab_size = 512" in text and "LossWeights.text = 0.0" in text
    gin_config.parse_gin(gin_files=[str(path)])
    assert gin_config.build("SpectronConfig") == config


# ---- every gin file -------------------------------------------------------------------------------------
def _all_gin_files() -> list[str]:
    return sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))


def test_gin_folders_are_complete():
    files = set(_all_gin_files())
    expected = {"models/tiny.gin", "models/small.gin", "models/spectron_350m.gin", "models/spectron_1b.gin",
                "encoders/conformer_600m.gin", "objectives/paper.gin", "objectives/no_text_ce.gin",
                "objectives/no_delta_losses.gin", "objectives/random_init_lm.gin",
                "objectives/random_init_encoder.gin", "objectives/random_init_both.gin"}
    assert expected <= files
    for name in expected:
        assert (GIN_DIR / name).read_text().startswith("#"), f"{name} must start with a comment"


@pytest.mark.parametrize("name", _all_gin_files())
def test_every_gin_file_parses_and_builds(name):
    folder = name.split("/", 1)[0]
    files = [name]
    if folder == "objectives":
        files = ["models/tiny.gin", name]  # an objective needs a model
    finalize = True
    if folder not in OWN_GIN_DIRS:
        # Run files also bind the training configurables and leave MODEL_DIR-like macros REQUIRED.
        train = pytest.importorskip("spectron_jax.train")
        if hasattr(train, "register_train_configurables"):
            train.register_train_configurables()
        finalize = False
    gin_config.parse_gin(gin_files=files, finalize=finalize)
    config = gin_config.build("SpectronConfig")
    assert config.acoustic.num_mel == 128  # the regression target
    # the encoder reads the log-mel frames, or 160 stacked fbank values per frame (w2v-BERT's front-end)
    assert config.encoder.input_dim == {"log_mel": 128, "w2v_bert_fbank": 160}[config.prompt_features]
    if config.prompt_features == "w2v_bert_fbank":
        assert gin_config.build("TaskConfig").prompt_features == config.prompt_features
    if folder == "encoders":
        encoder = gin_config.build("ConformerConfig")
        assert (encoder.num_layers, encoder.model_dim) == (24, 1024)
    if name == "models/tiny.gin":
        assert config.decoder.vocab_size == 512
    weights = config.loss_weights
    if name.endswith("no_text_ce.gin"):
        assert weights.text == 0.0 and weights.spectrogram == 1.0
    if name.endswith("no_delta_losses.gin"):
        assert weights.freq_delta == weights.time_delta == 0.0 and weights.text == weights.spec_frames == 1.0
    if name.endswith("paper.gin"):
        assert config.max_time_delta_order == 3
        assert all(getattr(weights, f) == 1.0 for f in ("text", "asr", "lm", "spectrogram", "spec_frames",
                                                          "freq_delta", "time_delta"))


@pytest.mark.parametrize("name, encoder, lm", [
    ("paper", "/e", "/l"), ("random_init_lm", "/e", None), ("random_init_encoder", None, "/l"),
    ("random_init_both", None, None), ("no_text_ce", "/e", "/l")])
def test_ablations_override_the_pretrained_macros(name, encoder, lm):
    gin_config.parse_gin(gin_files=["models/tiny.gin", f"objectives/{name}.gin"],
                         bindings=["PRETRAINED_ENCODER = '/e'", "PRETRAINED_LM = '/l'"])
    pretrained = gin_config.build("SpectronConfig").pretrained
    assert (pretrained.encoder_checkpoint, pretrained.lm_checkpoint) == (encoder, lm)


# ---- the summary CLI ------------------------------------------------------------------------------------
def test_summary_counts(tmp_path):
    # Three configurations in parallel subprocesses; tiny from another working directory.
    runs = {
        "tiny": _summary("--gin_file=models/tiny.gin", "--json", cwd=tmp_path),
        "1b": _summary("--gin_file=gin/models/spectron_1b.gin", "--json"),
        # (the 600M encoder is counted in the 1b run; one layer here keeps this run short)
        "350m": _summary("--gin_file=gin/models/spectron_350m.gin", "--json", "--gin.ConformerConfig.num_layers=1"),
    }
    # allocate the tiny model here while the subprocesses run
    gin_config.parse_gin(gin_files=["models/tiny.gin"])
    from spectron_jax.models.spectron_model import SpectronModel

    module = SpectronModel(gin_config.build("SpectronConfig")).make_module(0)
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results[name] = json.loads(next(l for l in reversed(out.splitlines()) if l.startswith("{")))  # the JSON line

    # tiny: the abstract counts equal a direct count of the allocated model's parameters
    tiny = results["tiny"]
    for name in COMPONENTS:
        part = getattr(module, name)
        direct = 0 if part is None else sum(x.size for x in jax.tree.leaves(nnx.state(part, nnx.Param)))
        assert tiny[name] == direct, name
    assert tiny["decoder_embedding"] == module.decoder.embedder.table.size == 512 * 128
    assert tiny["total"] == sum(tiny[name] for name in COMPONENTS)
    assert tiny["param_bytes"] == 4 * tiny["total"]

    one_b, m350 = results["1b"], results["350m"]
    assert abs(one_b["encoder"] - 600e6) <= 60e6
    assert abs(one_b["decoder"] - 1e9) <= 1e8
    assert abs(m350["decoder"] - 350e6) <= 35e6
    assert m350["decoder_embedding"] == one_b["decoder_embedding"] // 2 == 32768 * 1024
    assert one_b["projection"] == 1024 * 2048 + 2048


def test_summary_table(capsys):
    from spectron_jax import summary

    assert summary.main(["--gin_file=models/tiny.gin", "--gin.DecoderConfig.num_layers=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["component", "parameters"]
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines[1:]}
    assert list(rows) == ["encoder", "projection", "decoder", "embedding", "blocks", "prenet", "postnet",
                          "stop_head", "total"]
    assert rows["decoder"] == rows["embedding"] + rows["blocks"]
    assert rows["total"] == sum(rows[name] for name in COMPONENTS)
    config = gin_config.build("SpectronConfig")
    assert config.decoder.num_layers == 3
    assert rows == {**rows, **{k: v for k, v in summary.count_parameters(config).items() if k in rows}}


def test_summary_errors_are_one_line():
    cases = [
        (_summary("--gin_file=gin/models/does_not_exist.gin"), "--gin_file=gin/models/does_not_exist.gin: file not found"),
        (_summary("--json"), "--gin_file is required"),
        (_summary("--gin_file=models/tiny.gin", "--frobnicate"), "unrecognized arguments: --frobnicate"),
        (_summary("--gin_file=models/tiny.gin", "--gin.ConformerConfig.num_heads=3"), "cannot build SpectronConfig"),
    ]
    for proc, expected in cases:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], err[-2000:]
        assert "Traceback" not in err and out == ""
