"""What a new user meets first: ``fastdec check`` only says "ok" where a fused kernel ran against its reference and
says when there is no GPU; ``fastdec decode``'s messages speak CLI and name the problem; refused pickles and corrupt
files get one clean line without torch's weights_only=False advice; ``fastdec --help`` is plain text with examples;
installing raises no setuptools deprecation warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastdec
from fastdec import ops
from fastdec.api import RandomWeightsWarning
from fastdec.cli import main

REPO = Path(__file__).resolve().parents[1]


def op_lines(output: str) -> dict[tuple[str, str], str]:
    """(op, device) -> its result line of ``fastdec check``."""
    lines = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in ("ok", "FAIL", "skip"):
            lines[parts[1], parts[2]] = line
    return lines


def test_check_says_ok_only_where_a_fused_kernel_ran(capsys):
    assert main(["check"]) == 0
    output = capsys.readouterr().out
    lines = op_lines(output)
    assert {op for op, _ in lines} == set(ops.backends())
    for (op, device), line in lines.items():
        backend = ops.backends()[op][device]
        if backend.startswith("eager"):
            assert line.startswith("skip") and "skipped: no fused backend runs here" in line, line
        else:
            assert line.startswith("ok") and backend in line, line
    assert ("no GPU here" in output) == (not torch.cuda.is_available())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_check_without_the_interpreter_skips_the_triton_ops():
    """Without FASTDEC_TRITON_INTERPRET/TRITON_INTERPRET the Triton ops run their eager reference on CPU: comparing
    it with itself must not print "ok"."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDEC_TRITON_INTERPRET", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-m", "fastdec.cli", "check"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = op_lines(result.stdout)
    for op in ops.TRITON_OPS:
        assert lines[op, "cpu"].startswith("skip"), lines[op, "cpu"]
        assert "no fused backend runs here" in lines[op, "cpu"] and "FASTDEC_TRITON_INTERPRET=1" in lines[op, "cpu"]
    assert "no GPU here" in result.stdout and "not checked" in result.stdout


def decode_error(args: list[str], capsys) -> str:
    assert main(["decode", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdec decode: error: ")
    return err


def test_decode_messages_name_the_problem_in_cli_words(tmp_path, decoder_dir, capsys):
    err = decode_error([str(tmp_path)], capsys)
    assert "is a directory: pass a latents file" in err and "not found" not in err
    torch.save(torch.randn(1, 4, 2, 2), tmp_path / "z.pt")
    (tmp_path / "taken").write_text("")
    err = decode_error([str(tmp_path / "z.pt"), "--decoder", str(decoder_dir), "-o", str(tmp_path / "taken")], capsys)
    assert "is an existing file: pass a folder" in err and "Errno" not in err
    torch.save(torch.randn(1, 5, 2, 2), tmp_path / "five.pt")
    err = decode_error([str(tmp_path / "five.pt")], capsys)
    assert "no default decoder for 5-channel latents" in err and "--decoder" in err and "decoder=<" not in err


def test_library_advice_speaks_cli_in_the_cli_and_python_in_python(tmp_path, decoder_dir, capsys):
    """The same checks word their advice for who is asking: `--decoder taef1` and FASTDEC_CHECK_FINITE=0 on the
    command line, decoder='taef1' and check_finite=False from Python."""
    torch.save(torch.randn(1, 16, 2, 2), tmp_path / "sixteen.pt")
    err = decode_error([str(tmp_path / "sixteen.pt"), "--decoder", str(decoder_dir)], capsys)
    assert "(e.g. --decoder taef1)" in err and "decoder='" not in err
    nan = torch.randn(1, 4, 2, 2)
    nan[0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    err = decode_error([str(tmp_path / "nan.pt"), "--decoder", str(decoder_dir)], capsys)
    assert "FASTDEC_CHECK_FINITE=0" in err and "check_finite" not in err
    torch.save(torch.zeros(1, 4, 2, 2, dtype=torch.int32), tmp_path / "ints.pt")
    err = decode_error([str(tmp_path / "ints.pt"), "--decoder", str(decoder_dir)], capsys)
    assert "save them as float32" in err and ".float()" not in err
    torch.save(torch.randn(1, 4, 2, 2, 2), tmp_path / "video.pt")
    err = decode_error([str(tmp_path / "video.pt"), "--decoder", str(decoder_dir)], capsys)
    assert "--decoder taew2_1" in err and "fastdec.load" not in err and "transpose" not in err
    with pytest.warns(RandomWeightsWarning, match="--decoder vit-s built a") as caught:
        main(["decode", str(tmp_path / "nan.pt"), "--decoder", "vit-s", "-o", str(tmp_path / "out")])
    assert "fastdec.load" not in str(caught[0].message)
    capsys.readouterr()

    decoder = fastdec.load(str(decoder_dir))
    with pytest.raises(ValueError, match=r"\(e\.g\. decoder='taef1'\)"):
        fastdec.decode(torch.randn(1, 16, 2, 2), decoder)
    with pytest.raises(ValueError, match="check_finite=False or FASTDEC_CHECK_FINITE=0"):
        fastdec.decode(nan, decoder)
    with pytest.warns(RandomWeightsWarning, match=r"fastdec\.load\('vit-s'\) built a"):
        fastdec.load("vit-s")


class Namespaced:  # a pickled class: torch.load(weights_only=True) refuses its global
    def __init__(self):
        self.tensor = torch.zeros(2)


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_refused_pickles_and_random_bytes_read_cleanly(tmp_path, capsys, suffix):
    refused, garbage = tmp_path / f"taesd_decoder{suffix}", tmp_path / f"taesd_random{suffix}"
    torch.save({"a": Namespaced()}, refused)
    garbage.write_bytes(bytes(range(256)) * 8)
    messages = []
    for path in (refused, garbage):
        if suffix == ".pth":
            with pytest.raises(ValueError) as error:
                fastdec.load(path)
            messages.append(str(error.value))
        else:
            messages.append(decode_error([str(path)], capsys))
    for message in messages:
        assert "\x1b[" not in message and "\n" not in message.strip(), message
        assert "weights_only=False" not in message and "`False`" not in message and "two options" not in message
        assert "Weights only load failed" in message
    assert "GLOBAL" in messages[0] and "never unpickles" in messages[0] and "re-download" not in messages[0]
    assert "never unpickles" not in messages[1]


def test_top_level_help_is_plain_text_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    examples = text.split("examples:")[1]
    assert "fastdec decode " in examples and "fastdec bench --quick" in examples


def test_pyproject_installs_without_setuptools_deprecation_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distribution = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert distribution.metadata.license_expression == "MIT"


def test_help_shows_no_internal_option_and_check_says_what_it_does(capsys):
    for command in ("batch", "check"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--fail-after" not in out
    assert "runs each fused op against its eager reference" in out
