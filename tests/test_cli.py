"""The command line: ``export`` writes a report bundle, ``analyze`` prints a summary, bad input
exits with status 2 and a message, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cli
from analysis.bundle import MANIFEST_NAME
from analysis.settings import REPO_ROOT
from components import export

PROMPT = "The cat sat on the mat. The cat sat on the mat."


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_writes_a_bundle_with_the_chosen_layers_and_heads(
    capsys, cache_dir, tiny_model_dir, tmp_path
):
    code, out, err = run(
        capsys,
        "export",
        "--prompt",
        PROMPT,
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "bundles"),
        "--layers",
        "1",
        "--heads",
        "0,2",
        "--formats",
        "html,csv,npz",
    )

    assert code == 0, err
    path = Path(out.strip())
    assert path.parent == tmp_path / "bundles" and path.suffix == ".zip"
    archive = zipfile.ZipFile(path)
    manifest = json.loads(archive.read(MANIFEST_NAME))
    assert manifest["model"] == str(tiny_model_dir)
    assert manifest["prompts"] == [PROMPT]
    assert manifest["settings"]["layers"] == [1]
    assert manifest["settings"]["heads"] == [0, 2]
    assert {e["path"] for e in manifest["files"]} | {MANIFEST_NAME} == set(archive.namelist())
    names = set(archive.namelist())
    assert {"data/attention-L1-H0.npz", "data/attention-L1-H2.csv", "report.html"} <= names
    assert not any("attention-L0" in name for name in names)
    assert "export" in err  # the progress bar went to stderr


def test_analyze_prints_heads_by_type_and_retention_per_stage(capsys, cache_dir, tiny_model_dir):
    code, out, err = run(capsys, "analyze", "--prompt", PROMPT, "--model", str(tiny_model_dir))

    assert code == 0, err
    for label in ("previous token", "duplicate token", "induction"):
        assert label in out
    retention = out.split("Retention per stage", 1)[1]
    # A 2-layer model: the embedding, then after each layer.
    for stage in ("  embed ", "  after L0 ", "  after L1 "):
        assert stage in retention
    assert "after L2" not in retention


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--prompt", ""], "prompt is empty"),
        (["export", "--prompt", "x", "--formats", "png,gif"], "gif"),
        (["export", "--prompt", "x", "--scale", "0"], "scale"),
        (["export", "--prompt", "x", "--layers", "two"], "cannot read layers"),
        (["export", "--prompt", "x", "--heads", "3-1"], "runs backwards"),
        (["analyze", "--prompt", "\x00"], "control character"),
    ],
)
def test_bad_input_exits_2_with_a_message_before_loading_a_model(capsys, cache_dir, argv, message):
    code, out, err = run(capsys, *argv)

    assert code == cli.EXIT_BAD_INPUT
    assert message in err
    assert "Traceback" not in err
    assert out == ""


def test_layer_out_of_range_for_the_model_exits_2(capsys, cache_dir, tiny_model_dir, tmp_path):
    argv = ["export", "--prompt", PROMPT, "--model", str(tiny_model_dir), "--layers", "0,5"]
    out_dir = tmp_path / "bundles"
    code, _, err = run(capsys, *argv, "--out", str(out_dir), "--formats", "csv")

    assert code == cli.EXIT_BAD_INPUT
    assert "layers 5 is out of range" in err
    assert not out_dir.exists()


def test_unknown_model_exits_2(capsys, cache_dir, tmp_path):
    code, _, err = run(capsys, "analyze", "--prompt", "x", "--model", str(tmp_path / "nowhere"))

    assert code == cli.EXIT_BAD_INPUT
    assert "nowhere" in err


def test_out_that_is_a_file_exits_2(capsys, cache_dir, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")

    code, _, err = run(capsys, "export", "--prompt", "x", "--out", str(target))

    assert code == cli.EXIT_BAD_INPUT
    assert "is a file" in err


def test_flag_of_the_wrong_type_is_an_argparse_error_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--prompt", "x", "--scale", "big"])

    assert exit_info.value.code == 2
    assert "--scale" in capsys.readouterr().err


def test_register_adds_commands_to_another_parser():
    parser = argparse.ArgumentParser(prog="app.py")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run")
    cli.register(commands)

    args = parser.parse_args(["export", "--prompt", "x", "--layers", "0"])

    assert args.command == "export"
    assert args.model == "memlens-demo"
    assert args.layers == "0"
    assert callable(args.handler)


def test_standalone_script_exits_2_on_bad_input_without_a_traceback(cache_dir):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), "export", "--prompt", "   "],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=600,
    )

    assert result.returncode == 2
    assert "the prompt is empty" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.browser
def test_export_with_images_writes_pngs_of_the_requested_scale(
    capsys, cache_dir, tiny_model_dir, tmp_path
):
    code, out, err = run(
        capsys,
        "export",
        "--prompt",
        PROMPT,
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path),
        "--formats",
        "png",
        "--scale",
        "1",
        "--layers",
        "0",
    )

    assert code == 0, err
    archive = zipfile.ZipFile(out.strip())
    png = archive.read("png/loss.png")
    width, height = struct.unpack(">II", png[16:24])
    # Scale 1: the figure's own size in CSS pixels (the loss figure's size is fixed).
    assert (width, height) == export.image_size(export.make_loss_figure([0.0], ["a", "b"]))
