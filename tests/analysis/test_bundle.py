"""Report-bundle plumbing: selections, manifest, ZIP, atomic writes and the collected inputs."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from datetime import UTC, datetime

import numpy as np
import pytest

import analysis
from analysis.bundle import (
    MANIFEST_NAME,
    bundle_filename,
    collect_report,
    make_manifest,
    parse_indices,
    write_atomic,
    zip_files,
)
from analysis.retention import logit_lens, resid_norms

ATOL = 1e-6


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, None), ("", None), ("all", None), ("2", (2,)), ("0, 2", (0, 2))],
)
def test_parse_indices_reads_lists_and_all(text, expected):
    assert parse_indices(text, 4, "layers") == expected


def test_parse_indices_expands_ranges_and_drops_repeats():
    assert parse_indices("1-3,2,0", 4, "heads") == (1, 2, 3, 0)


@pytest.mark.parametrize(
    ("text", "message"), [("4", "out of range"), ("a", "cannot read"), ("3-1", "backwards")]
)
def test_parse_indices_refuses_what_is_not_a_selection(text, message):
    with pytest.raises(ValueError, match=message):
        parse_indices(text, 4, "layers")


def test_manifest_lists_files_sorted_with_size_and_sha256():
    files = {"b.txt": b"bee", "a/c.bin": b"\x00\x01"}

    manifest = make_manifest(
        files,
        model_id="m",
        fingerprint="f",
        prompts=["p"],
        settings={"scale": 2},
        created=datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC),
    )

    assert manifest["created_utc"] == "2025-01-31T12:00:00Z"
    assert manifest["files"] == [
        {"path": "a/c.bin", "bytes": 2, "sha256": hashlib.sha256(b"\x00\x01").hexdigest()},
        {"path": "b.txt", "bytes": 3, "sha256": hashlib.sha256(b"bee").hexdigest()},
    ]


def test_manifest_refuses_to_list_itself():
    with pytest.raises(ValueError, match=MANIFEST_NAME):
        make_manifest({MANIFEST_NAME: b""}, model_id="m", fingerprint="f", prompts=[], settings={})


def test_zip_holds_every_file_and_the_manifest():
    files = {"png/x.png": b"\x89PNG...", "data/x.csv": b"a,b\n1,2\n"}

    archive = zipfile.ZipFile(io.BytesIO(zip_files(files, {"format": 1})))

    assert sorted(archive.namelist()) == sorted([*files, MANIFEST_NAME])
    assert json.loads(archive.read(MANIFEST_NAME)) == {"format": 1}
    assert archive.getinfo("png/x.png").compress_type == zipfile.ZIP_STORED
    assert archive.getinfo("data/x.csv").compress_type == zipfile.ZIP_DEFLATED
    for name, content in files.items():
        assert archive.read(name) == content


def test_write_atomic_keeps_the_old_file_when_the_replace_fails(tmp_path, monkeypatch):
    target = write_atomic(tmp_path / "bundle.zip", b"old")

    def crash(*args, **kwargs):
        raise OSError("killed")

    with monkeypatch.context() as patch:
        patch.setattr("analysis.bundle.os.replace", crash)
        with pytest.raises(OSError, match="killed"):
            write_atomic(target, b"new")

    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.zip"]


def test_bundle_filename_is_safe_and_names_model_prompt_and_time():
    created = datetime(2025, 1, 31, 12, 0, 5, tzinfo=UTC)

    name = bundle_filename("/models/my model", "hello", created)

    digest = hashlib.sha256(b"hello").hexdigest()[:8]
    assert name == f"memlens-my-model-{digest}-20250131T120005Z.zip"


def test_collect_report_reads_the_analysis(cache_dir, store, tiny_model_dir):
    pa = analysis.analyze("a b a b", str(tiny_model_dir), allow_any_path=True, store=store)

    inputs = collect_report(pa, layers=[1], heads=[3, 0])

    assert inputs.layers == (1,)
    assert inputs.heads == (3, 0)
    assert inputs.fingerprint == pa.meta["fingerprint"]
    np.testing.assert_allclose(inputs.attention(1), pa.attention(1), atol=ATOL)
    np.testing.assert_allclose(inputs.loss, pa.loss, atol=ATOL)
    np.testing.assert_allclose(inputs.resid_norms, resid_norms(pa), atol=ATOL)
    np.testing.assert_array_equal(inputs.lens_rank, logit_lens(pa).token_rank)
    assert inputs.settings()["analysis_options"] == pa.options


def test_collect_report_defaults_to_every_layer_and_refuses_bad_heads(
    cache_dir, store, tiny_model_dir
):
    pa = analysis.analyze("a b", str(tiny_model_dir), allow_any_path=True, store=store)

    assert collect_report(pa, retention=False).layers == tuple(range(pa.n_layers))
    with pytest.raises(ValueError, match="heads 4 is out of range"):
        collect_report(pa, heads=[4], retention=False)
