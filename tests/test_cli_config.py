"""``--config FILE``: a command's options from a YAML / JSON / TOML file, the command line overriding
them; every key and value checked with the file named."""

import json
import sysconfig
from pathlib import Path

import pytest

import apr_kernels
from apr_kernels.cli import build_parser, main
from apr_kernels.cli_config import expand

STDLIB = Path(sysconfig.get_paths()["stdlib"])
OPTIONS = {"preset": "tiny_llama", "tokenizer": "bytes", "data": [str(STDLIB / "textwrap.py")], "steps": 3,
           "batch_size": 2, "seq_len": 32, "eval_tokens": 64, "lr": 3e-3, "json": True, "no_token_cache": True,
           "lora_rank": 2, "lora_targets": "q_proj,v_proj"}
FLAGS = ["--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"), "--steps", "3",
         "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--lr", "3e-3", "--json", "--no-token-cache",
         "--lora-rank", "2", "--lora-targets", "q_proj,v_proj"]


def _write(path: Path, options: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(options))
    elif path.suffix == ".toml":
        def value(v):
            return "[" + ", ".join(value(x) for x in v) + "]" if isinstance(v, list) else json.dumps(v)

        path.write_text("".join(f"{k} = {value(v)}\n" for k, v in options.items()))
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(options))
    return path


def _train(capsys, argv) -> tuple[list[dict], dict]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    out_dir = Path(argv[argv.index("--out") + 1])
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return recs, apr_kernels.open(out_dir / "model.apr").metadata["training.config"]


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_a_config_file_runs_as_its_options_on_the_command_line(tmp_path, capsys, suffix):
    want, want_cfg = _train(capsys, ["train", *FLAGS, "--out", str(tmp_path / "flags")])
    config = _write(tmp_path / f"run{suffix}", OPTIONS)
    got, got_cfg = _train(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "file")])
    assert [r["loss"] for r in got if r["event"] == "train"] == [r["loss"] for r in want if r["event"] == "train"]
    assert got_cfg == want_cfg and got[0]["lora_rank"] == 2


def test_the_command_line_overrides_the_file(tmp_path, capsys):
    config = _write(tmp_path / "run.json", {**OPTIONS, "--lr": 1e-3})  # "--lr" spelled as on the command line
    recs, cfg = _train(capsys, ["train", f"--config={config}", "--steps", "2", "--out", str(tmp_path / "a")])
    assert [r["step"] for r in recs if r["event"] == "train"] == [1, 2] and cfg["lr"] == 1e-3
    # --epochs on the command line replaces the file's steps (a mutually exclusive pair), no conflict
    recs, cfg = _train(capsys, ["train", "--config", str(config), "--epochs", "0.001", "--out", str(tmp_path / "b")])
    assert cfg["steps"] == 1 and [r["step"] for r in recs if r["event"] == "train"] == [1]


def test_switches_and_paired_switches_become_their_flags(tmp_path):
    parser = build_parser()
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"document_mask": False, "max_tokens": 100, "data": "a.txt", "json": True,
                                "seq_len": None}))
    assert expand(parser, ["eval", "--config", str(path), "--init", "m.apr"]) == [
        "eval", "--no-document-mask", "--max-tokens", "100", "--data", "a.txt", "--json", "--init", "m.apr"]
    path.write_text(json.dumps({"no_document_mask": False, "json": False}))
    assert expand(parser, ["eval", "--config", str(path)]) == ["eval", "--document-mask"]
    assert expand(parser, ["eval", "--init", "m.apr"]) == ["eval", "--init", "m.apr"]  # no --config: as it was


@pytest.mark.parametrize("content, needle", [
    ({"stepz": 3}, "'stepz' is not an option of train; did you mean 'steps'?"),
    ({"lr": "fast"}, "lr='fast'; expected a valid float"),
    ({"precision": "fp8"}, "precision='fp8'; expected one of auto, bf16, fp16, fp32"),
    ({"steps": [1, 2]}, "steps=[1, 2]; expected one value, not a list"),
    ({"json": "yes"}, "json='yes'; expected true or false (a switch)"),
    ({"data": [{"a": 1}]}, "expected a number or a string"),
    ({"config": "other.yaml"}, "a config file cannot name another"),
    ([1, 2], "holds a list; expected a mapping of option name to value"),
])
def test_bad_config_files_are_one_line_naming_file_and_key(tmp_path, capsys, content, needle):
    path = _write(tmp_path / "bad.json", content)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and needle in err[0], err


def test_unreadable_config_files(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("steps: [1, 2\n")
    (tmp_path / "bad.toml").write_text("steps = \n")
    (tmp_path / "bad.json").write_text("{steps: 1}")
    (tmp_path / "run.ini").write_text("[x]\n")
    for name, needle in (("bad.yaml", "not valid YAML"), ("bad.toml", "not valid TOML"), ("bad.json", "not valid JSON"),
                         ("run.ini", "unknown format .ini"), ("missing.json", "no such file")):
        if name == "bad.yaml":
            pytest.importorskip("yaml")
        assert main(["train", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (name, err)
    assert main(["--config", str(tmp_path / "run.ini"), "train"]) == 2
    assert "--config FILE goes after a command" in capsys.readouterr().err
