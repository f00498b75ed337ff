"""Profiles are data: every shipped file loads and names files as its challenge documents; a new file is a new
profile; the submission package stays free of pre-training code."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import mim_nnunet.submission as submission_pkg
from mim_nnunet.submission.profiles import (
    Case,
    ProfileError,
    available_profiles,
    load_profile,
    model_variables,
    written_labels,
)


def case_for(profile, file_name):
    m = profile.match(file_name)
    assert m is not None, f"{profile.name} does not accept {file_name}"
    groups = {k: v for k, v in m.groupdict().items() if v is not None}
    return Case(groups["case"], (Path(file_name),), groups, ".nii.gz")


@pytest.mark.parametrize(
    "profile,image,expected",
    [
        ("generic", "liver_007_0000.nii.gz", "liver_007.nii.gz"),
        ("generic", "scan_12.nii.gz", "scan_12.nii.gz"),
        ("msd", "hippocampus_267.nii.gz", "Task04_Hippocampus/hippocampus_267.nii.gz"),
        ("msd", "hippocampus_267_0000.nii.gz", "Task04_Hippocampus/hippocampus_267.nii.gz"),
        ("btcv", "img0061.nii.gz", "label0061.nii.gz"),
        ("btcv", "img0061_0000.nii.gz", "label0061.nii.gz"),
        ("amos22", "amos_0507.nii.gz", "amos_0507.nii.gz"),
        ("amos", "amos_0507_0000.nii.gz", "amos_0507.nii.gz"),
        ("flare22", "FLARETs_0001_0000.nii.gz", "FLARETs_0001.nii.gz"),
        ("flare", "FLARE22_Tr_0042_0000.nii.gz", "FLARE22_Tr_0042.nii.gz"),
        ("flare23", "FLARE23Ts_0001_0000.nii.gz", "FLARE23Ts_0001.nii.gz"),
        ("kits23", "case_00400_0000.nii.gz", "case_00400.nii.gz"),
        ("kits23", "case_00400.nii.gz", "case_00400.nii.gz"),
    ],
)
def test_output_names(profile, image, expected):
    p = load_profile(profile)
    variables = model_variables("Dataset004_Hippocampus")
    assert p.output_relpath(case_for(p, image), variables) == expected


@pytest.mark.parametrize(
    "profile,image",
    [
        ("btcv", "label0061.nii.gz"),
        ("amos22", "amos_61.nii.gz"),
        ("kits23", "case_400.nii.gz"),
        ("flare22", "x.nii.gz"),
    ],
)
def test_foreign_names_are_rejected(profile, image):
    assert load_profile(profile).match(image) is None


def test_every_shipped_profile_is_documented_and_loads():
    names = available_profiles()
    assert {"generic", "msd", "btcv", "amos22", "flare22", "kits23"} <= set(names)
    for name, path in names.items():
        p = load_profile(name)
        assert p.name == name == path.stem
        assert len(p.source) > 40, f"{name}: say where the convention comes from"
        assert p.dtype == "uint8"


@pytest.mark.parametrize(
    "profile,n_labels,some",
    [
        ("btcv", 14, {6: "liver", 11: "pancreas"}),
        ("amos22", 16, {15: "prostate/uterus"}),
        ("flare22", 14, {1: "liver", 13: "left kidney"}),
        ("flare23", 15, {14: "tumor"}),
        ("kits23", 4, {1: "kidney", 2: "tumor", 3: "cyst"}),
    ],
)
def test_label_sets(profile, n_labels, some):
    p = load_profile(profile)
    assert set(p.labels) == set(range(n_labels))
    assert all(p.labels[k] == v for k, v in some.items())
    assert p.allowed_labels() == set(range(n_labels))


def test_model_label_set_and_label_map():
    p = load_profile("generic")
    assert p.allowed_labels({"background": 0, "a": 1, "b": 2}) == {0, 1, 2}
    with pytest.raises(ProfileError, match="label set from the model"):
        p.allowed_labels()


def test_adding_a_profile_is_adding_a_file(tmp_path):
    spec = {
        "name": "mychallenge",
        "source": "made up for this test: predictions pred_<num>.mha from scan<num>_0000.nii.gz, labels 0/5",
        "input": {"pattern": "(?P<case>scan(?P<num>\\d+))_(?P<channel>\\d{4})\\.nii\\.gz"},
        "output": {"name": "pred_{num}", "folder": "segs", "file_ending": ".mha", "dtype": "uint8"},
        "labels": {"0": "background", "5": "lesion"},
        "label_map": {"1": 5},
    }
    path = tmp_path / "mychallenge.json"
    path.write_text(json.dumps(spec))
    p = load_profile(path)
    assert p.output_relpath(case_for(p, "scan12_0000.nii.gz")) == "segs/pred_12.mha"
    assert p.allowed_labels() == {0, 5} and p.map_label(1) == 5


def test_bad_profiles_fail_with_the_field_named(tmp_path):
    base = {"name": "x", "source": "s", "input": {"pattern": "(?P<id>.+)"}, "output": {"name": "{case}"}}
    (tmp_path / "a.json").write_text(json.dumps(base))
    with pytest.raises(ProfileError, match="no named group 'case'"):
        load_profile(tmp_path / "a.json")
    base["input"]["pattern"] = "(?P<case>.+)\\.nii\\.gz"
    base["output"]["dtype"] = "float32"
    (tmp_path / "b.json").write_text(json.dumps(base))
    with pytest.raises(ProfileError, match="output.dtype"):
        load_profile(tmp_path / "b.json")
    with pytest.raises(ProfileError, match="unknown profile"):
        load_profile("no_such_challenge")


def test_msd_layout_needs_the_task_variable():
    p = load_profile("msd")
    with pytest.raises(ProfileError, match="msd_task"):
        p.output_relpath(case_for(p, "hippocampus_267.nii.gz"))
    assert model_variables("Dataset010_Colon")["msd_task"] == "Task10_Colon"


def test_cases_group_channels(tmp_path):
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = load_profile("generic").collect_cases(tmp_path)
    assert [(c.case_id, [p.name for p in c.images]) for c in cases] == [
        ("a", ["a_0000.nii.gz"]),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"]),
    ]
    (tmp_path / "c_0001.nii.gz").write_bytes(b"")
    with pytest.raises(ProfileError, match="case c: channels \\[1\\]"):
        load_profile("generic").collect_cases(tmp_path)


FORBIDDEN = (
    "mim_nnunet.model",
    "mim_nnunet.pretrain",
    "mim_nnunet.masking",
    "mim_nnunet.losses",
    "mim_nnunet.checkpoint",
    "mim_nnunet.nnunet",
    "mim_nnunet.data",
)


def test_submission_imports_no_pretraining_code():
    root = Path(submission_pkg.__file__).parent
    files = [*root.rglob("*.py"), root.parent / "cli" / "submit.py"]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module if node.level == 0 else "mim_nnunet.submission." + node.module]
            for n in names:
                assert not n.startswith(FORBIDDEN), f"{f.name} imports {n}"


def test_label_map_by_name_between_challenges():
    """A model trained with FLARE22's numbering, submitted to BTCV: same organs, other values."""
    flare_model = {
        "background": 0,
        "Liver": 1,
        "right_kidney": 2,
        "Spleen": 3,
        "gall-bladder": 9,
        "Duodenum": 12,
    }
    btcv = load_profile("btcv")
    with pytest.raises(ProfileError, match=r"Duodenum \(12\)"):
        btcv.label_map_by_name(flare_model)
    assert btcv.label_map_by_name(flare_model, keep={12}) == {0: 0, 1: 6, 2: 2, 3: 1, 9: 4}
    with pytest.raises(ProfileError, match="no label names"):
        load_profile("generic").label_map_by_name(flare_model)


def test_two_cases_on_one_output_name_is_an_error(tmp_path):
    from mim_nnunet.submission.pipeline import check_distinct_outputs

    spec = {
        "name": "lossy",
        "source": "test: a template that drops the distinguishing part of the name",
        "input": {"pattern": "(?P<case>(?P<site>[a-z]+)_\\d+)\\.nii\\.gz"},
        "output": {"name": "{site}.nii.gz"},
    }
    (tmp_path / "lossy.json").write_text(json.dumps(spec))
    p = load_profile(tmp_path / "lossy.json")
    relpaths = {c: p.output_relpath(case_for(p, f"{c}.nii.gz")) for c in ("mri_1", "mri_2")}
    with pytest.raises(ProfileError, match="cases mri_1 and mri_2 would both be written to mri.nii.gz"):
        check_distinct_outputs(relpaths, p)


# ---- nnU-Net region models (issue 11, point 5) ---------------------------------------------------------------
KITS_REGION_MODEL = {  # nnunetv2/dataset_conversion/Dataset220_KiTS2023.py
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
    "regions_class_order": [1, 3, 2],
    "file_ending": ".nii.gz",
}


def test_region_model_writes_regions_class_order_values():
    """nnU-Net writes regions_class_order[i] for region i: kidney 1, masses 3 (= cyst), tumor 2."""
    assert written_labels(KITS_REGION_MODEL) == {"background": 0, "kidney": 1, "masses": 3, "tumor": 2}
    assert load_profile("generic").allowed_labels(KITS_REGION_MODEL) == {0, 1, 2, 3}
    assert load_profile("kits23").label_map_by_name(KITS_REGION_MODEL) == {0: 0, 1: 1, 3: 3, 2: 2}
    with pytest.raises(ProfileError, match="regions_class_order"):
        written_labels({"labels": KITS_REGION_MODEL["labels"]})


def test_region_model_with_other_numbering_maps_by_region_membership():
    """A model numbering tumor 3 and cyst 2: the regions that contain a value identify it on both sides."""
    model = {
        "labels": {"background": 0, "Kidney": [1, 2, 3], "Masses": [2, 3], "Tumor": 3},
        "regions_class_order": [1, 2, 3],
    }
    assert load_profile("kits23").label_map_by_name(model) == {0: 0, 1: 1, 2: 3, 3: 2}
    unknown = {"labels": {"background": 0, "organ": [1, 2], "part": 2}, "regions_class_order": [1, 2]}
    with pytest.raises(ProfileError, match=r"model regions \['organ \[1, 2\]', 'part \[2\]'\]"):
        load_profile("kits23").label_map_by_name(unknown)
    bad_order = {**KITS_REGION_MODEL, "regions_class_order": [1, 3, 7]}
    with pytest.raises(ProfileError, match=r"writes \[7\], which no model region contains"):
        load_profile("kits23").label_map_by_name(bad_order)


# ---- case naming (point 8) --------------------------------------------------------------------------------------
def names_of(cases):
    return [(c.case_id, [p.name for p in c.images]) for c in cases]


@pytest.mark.parametrize(
    "files,expected",
    [
        (["amos_0001.nii.gz", "amos_0002.nii.gz"], ["amos_0001", "amos_0002"]),
        (["FLARE22_Tr_0001.nii.gz"], ["FLARE22_Tr_0001"]),
        (["FLARE22_Tr_0001_0000.nii.gz"], ["FLARE22_Tr_0001"]),
        (["a_0000.nii.gz", "b_0000.nii.gz"], ["a", "b"]),
    ],
)
def test_trailing_digits_are_a_channel_only_when_they_read_as_channels(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    cases = load_profile("generic").collect_cases(tmp_path)
    assert [c.case_id for c in cases] == expected
    p = load_profile("generic")
    assert p.output_relpath(cases[0]) == f"{expected[0]}.nii.gz"


def test_model_channel_count_decides_between_channels_and_cases(tmp_path):
    for name in ("x_0000.nii.gz", "x_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    generic = load_profile("generic")
    assert names_of(generic.collect_cases(tmp_path, n_channels=2)) == [
        ("x", ["x_0000.nii.gz", "x_0001.nii.gz"])
    ]
    assert [c.case_id for c in generic.collect_cases(tmp_path, n_channels=1)] == ["x_0000", "x_0001"]


@pytest.mark.parametrize("ending", [".png", ".bmp", ".tif", ".tiff", ".nrrd"])
def test_nnunet_image_formats_are_accepted(tmp_path, ending):
    (tmp_path / f"slice_007_0000{ending}").write_bytes(b"")
    p = load_profile("generic")
    (case,) = p.collect_cases(tmp_path)
    assert (case.case_id, case.ending) == ("slice_007", ending)
    assert p.output_relpath(case) == f"slice_007{ending}"


def test_appledouble_and_underscore_files_are_skipped(tmp_path, caplog):
    for name in ("hippocampus_267.nii.gz", "._hippocampus_267.nii.gz", "_hidden_1.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = load_profile("msd").collect_cases(tmp_path)
    assert names_of(cases) == [("hippocampus_267", ["hippocampus_267.nii.gz"])]
    assert "._hippocampus_267.nii.gz" in caplog.text


# ---- path containment (point 9) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../evil", "a//b", "a/../../b", "..", "x/./y", "C:evil", "a\\\\..\\\\b"])
def test_output_paths_cannot_leave_the_output_folder(bad):
    p = load_profile("msd")
    case = case_for(p, "hippocampus_267.nii.gz")
    with pytest.raises(ProfileError, match="not a plain relative path inside the output folder"):
        p.output_relpath(case, {"msd_task": bad})
    # the model's dataset name feeds msd_task too
    with pytest.raises(ProfileError, match="inside the output folder"):
        p.output_relpath(case, model_variables("Dataset004_../../evil"))


def test_profile_templates_and_zip_root_cannot_escape(tmp_path):
    spec = {
        "name": "escape",
        "source": "test",
        "input": {"pattern": "(?P<case>.+)\\.nii\\.gz"},
        "output": {"name": "../{case}.nii.gz"},
    }
    (tmp_path / "escape.json").write_text(json.dumps(spec))
    p = load_profile(tmp_path / "escape.json")
    with pytest.raises(ProfileError, match="inside the output folder"):
        p.output_relpath(case_for(p, "x.nii.gz"))
    spec["output"] = {"name": "{case}.nii.gz", "zip_root": "../up"}
    (tmp_path / "escape.json").write_text(json.dumps(spec))
    with pytest.raises(ProfileError, match="zip_root"):
        load_profile(tmp_path / "escape.json")


# ---- sources, rules, help (points 11-13) -----------------------------------------------------------------------
def test_each_convention_cites_its_source():
    for name in available_profiles():
        p = load_profile(name)
        assert p.sources, f"{name}: no sources"
        for key, cite in p.sources.items():
            assert len(cite) > 30, f"{name}: source of {key} is not a citation: {cite!r}"
    for name in ("kits23", "flare22", "flare23"):
        p = load_profile(name)
        assert all("github.com/" in c for c in p.sources.values()) or name.startswith("flare")
        assert "github.com/" in p.evaluation.source
    assert "amos22.grand-challenge.org/Evaluation/" in load_profile("amos22").sources["upload"]


def test_help_lists_profiles_and_trust(capsys):
    from mim_nnunet.cli.submit import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in available_profiles():
        assert name in text
    assert "weights_only=False" in text and "trust" in text and "unpickled" in text


def test_profiles_command_shows_rules(capsys):
    from mim_nnunet.cli.submit import main as cli_main

    assert cli_main(["profiles"]) == 0
    out = capsys.readouterr().out
    flare22 = out[out.index("flare22 -") : out.index("flare23 -")]
    assert "no pre-trained models" in flare22 and "No additional data" in flare22
    assert "running time" in flare22 and "GPU memory" in flare22
    assert "liver 5, right kidney 3" in flare22
    assert "torch.load(..., weights_only=False)" in out
