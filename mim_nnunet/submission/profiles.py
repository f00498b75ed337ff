"""Challenge profiles: how a challenge names, labels, stores and lays out its prediction files.

A profile is data (``profiles/<name>.json``), never a code branch: adding a challenge is adding a file. This module
owns loading and checking those files and turning an input image name into the file name the challenge expects.
It must not import nnU-Net or any pre-training code.

Fields of a profile file (see ``docs/submission.md``):

- ``name``, ``title``, ``source`` (where the convention comes from), ``notes``, optional ``aliases``.
- ``input.pattern``: a regex matched against each test image's file name. The named group ``case`` is the case
  id; the optional group ``channel`` is nnU-Net's ``_XXXX`` channel suffix; every other named group can be used in
  the output templates.
- ``output.name``: a ``str.format`` template for the prediction file name (fields: the regex groups plus the
  variables below). ``output.folder``: a template for the folder the predictions go into ("" = top level).
  ``output.file_ending``: the format (``.nii.gz``, ``.mha``, ...; ``null`` keeps the input's ending).
  ``output.dtype``: the integer pixel type written.
- ``labels``: ``{value: name}`` of the challenge's label set, or ``null`` to take the label set from the model's
  ``dataset.json`` (after ``label_map``).
- ``label_map``: optional ``{model value: challenge value}``; values not listed map to themselves.

Template variables besides the regex groups: ``ending`` (the input's file ending), ``dataset_id``,
``dataset_name`` (nnU-Net's ``DatasetXXX_Name`` split), ``msd_task`` (``TaskXX_Name``), and any ``--var K=V``.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

# The endings nnU-Net's SimpleITK reader handles, longest first so ".nii.gz" wins over ".gz"-less ".nii".
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
INTEGER_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")


class ProfileError(ValueError):
    """A profile file, a template or a file name does not fit the profile."""


@dataclass(frozen=True)
class Case:
    """One test case: its id, its image files in channel order, and the regex groups of its first file."""

    case_id: str
    images: tuple[Path, ...]
    groups: dict[str, str]
    ending: str

    @property
    def reference_image(self) -> Path:
        """The image whose geometry the prediction must reproduce (channel 0)."""
        return self.images[0]


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    source: str
    input_pattern: str
    output_name: str
    output_folder: str = ""
    file_ending: str | None = None
    dtype: str = "uint8"
    labels: dict[int, str] | None = None
    label_map: dict[int, int] = field(default_factory=dict)
    notes: str = ""
    aliases: tuple[str, ...] = ()
    path: Path | None = None

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> Profile:
        where = str(path) if path else "profile"
        for key in ("name", "source", "input", "output"):
            if key not in d:
                raise ProfileError(f"{where}: missing required field '{key}'")
        inp, out = d["input"], d["output"]
        if "pattern" not in inp:
            raise ProfileError(f"{where}: missing required field 'input.pattern'")
        if "name" not in out:
            raise ProfileError(f"{where}: missing required field 'output.name'")
        try:
            rx = re.compile(inp["pattern"])
        except re.error as e:
            raise ProfileError(f"{where}: input.pattern is not a valid regex: {e}") from e
        if "case" not in rx.groupindex:
            raise ProfileError(f"{where}: input.pattern {inp['pattern']!r} has no named group 'case'")
        dtype = out.get("dtype", "uint8")
        if dtype not in INTEGER_DTYPES:
            raise ProfileError(f"{where}: output.dtype {dtype!r} is not one of {INTEGER_DTYPES}")
        ending = out.get("file_ending")
        if ending is not None and ending not in IMAGE_ENDINGS:
            raise ProfileError(f"{where}: output.file_ending {ending!r} is not one of {IMAGE_ENDINGS}")
        labels = d.get("labels")
        labels = None if labels is None else {int(k): str(v) for k, v in labels.items()}
        if labels is not None:
            hi = np.iinfo(dtype).max
            lo = np.iinfo(dtype).min
            bad = [v for v in labels if not lo <= v <= hi]
            if bad:
                raise ProfileError(f"{where}: label values {bad} do not fit output.dtype {dtype}")
        for tpl_key, tpl in (("output.name", out["name"]), ("output.folder", out.get("folder", ""))):
            try:
                list(string.Formatter().parse(tpl))
            except ValueError as e:
                raise ProfileError(f"{where}: {tpl_key} {tpl!r} is not a valid template: {e}") from e
        return cls(
            name=d["name"],
            title=d.get("title", d["name"]),
            source=d["source"],
            input_pattern=inp["pattern"],
            output_name=out["name"],
            output_folder=out.get("folder", ""),
            file_ending=ending,
            dtype=dtype,
            labels=labels,
            label_map={int(k): int(v) for k, v in d.get("label_map", {}).items()},
            notes=d.get("notes", ""),
            aliases=tuple(d.get("aliases", ())),
            path=path,
        )

    # ---- naming -------------------------------------------------------------------------------------------------
    def match(self, file_name: str) -> re.Match | None:
        return re.fullmatch(self.input_pattern, file_name)

    def collect_cases(self, images_dir: str | Path) -> list[Case]:
        """Group the image files of a folder into cases (channels sorted), as the profile's pattern reads them."""
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise ProfileError(f"images folder {images_dir} does not exist")
        by_case: dict[str, list[tuple[int, Path, dict]]] = {}
        for p in sorted(images_dir.iterdir()):
            if not p.is_file() or not p.name.endswith(IMAGE_ENDINGS):
                continue
            m = self.match(p.name)
            if m is None:
                raise ProfileError(
                    f"{p.name}: does not match the input pattern of profile '{self.name}' ({self.input_pattern})"
                )
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            channel = int(groups.get("channel", 0))
            by_case.setdefault(groups["case"], []).append((channel, p, groups))
        cases = []
        for case_id, entries in sorted(by_case.items()):
            entries.sort(key=lambda e: e[0])
            channels = [e[0] for e in entries]
            if channels != list(range(len(channels))):
                names = ", ".join(e[1].name for e in entries)
                raise ProfileError(
                    f"case {case_id}: channels {channels} are not 0..{len(channels) - 1} ({names})"
                )
            first = entries[0][1].name
            ending = next(e for e in IMAGE_ENDINGS if first.endswith(e))
            cases.append(Case(case_id, tuple(e[1] for e in entries), entries[0][2], ending))
        if not cases:
            raise ProfileError(
                f"images folder {images_dir} holds no image files ({', '.join(IMAGE_ENDINGS)})"
            )
        return cases

    def output_relpath(self, case: Case, variables: dict[str, str] | None = None) -> str:
        """The prediction's path relative to the submission root, e.g. ``Task04_Hippocampus/hippocampus_267.nii.gz``."""
        fields = {**(variables or {}), **case.groups, "case": case.case_id, "ending": case.ending}
        ending = self.file_ending or case.ending
        name = _format(self.output_name, fields, self.name, "output.name")
        if not name.endswith(ending):
            name += ending
        folder = _format(self.output_folder, fields, self.name, "output.folder").strip("/")
        return f"{folder}/{name}" if folder else name

    # ---- labels -------------------------------------------------------------------------------------------------
    def allowed_labels(self, model_labels: dict[str, int] | None = None) -> set[int]:
        """The label values a valid prediction may contain.

        ``model_labels`` is the ``labels`` entry of the model's dataset.json ({name: value}); it is used (through
        ``label_map``) when the profile has no label set of its own.
        """
        if self.labels is not None:
            return set(self.labels)
        if model_labels is None:
            raise ProfileError(
                f"profile '{self.name}' takes its label set from the model: pass a model (-m) or --labels"
            )
        return {self.map_label(_label_value(v)) for v in model_labels.values()}

    def map_label(self, value: int) -> int:
        return self.label_map.get(value, value)

    def label_map_by_name(self, model_labels: dict[str, int], keep: set[int] = frozenset()) -> dict[int, int]:
        """{model value: challenge value} pairing the model's label names with the profile's.

        Names compare case-, space-, '_' and '-'-insensitively ("Gall_Bladder" = "gallbladder"). Challenges
        number the same organs differently (BTCV liver 6, FLARE22 liver 1); this is the map between them.
        Model values in ``keep`` are left to an explicit map. An unmatched name is an error.
        """
        if self.labels is None:
            raise ProfileError(
                f"profile '{self.name}' has no label names to match (its labels come from the model)"
            )
        by_name = {_norm(n): v for v, n in self.labels.items()}
        out, unmatched = {}, []
        for name, value in model_labels.items():
            value = _label_value(value)
            if value in keep:
                continue
            if _norm(name) in by_name:
                out[value] = by_name[_norm(name)]
            else:
                unmatched.append(f"{name} ({value})")
        if unmatched:
            raise ProfileError(
                f"profile '{self.name}': model labels {unmatched} have no namesake among {sorted(self.labels.values())}; "
                "map them with --label-map SRC:DST"
            )
        return out


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def _label_value(v) -> int:
    # dataset.json labels are ints, or tuples for region-based training (the first entry is the written value).
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _format(template: str, fields: dict, profile: str, key: str) -> str:
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ProfileError(
            f"profile '{profile}': {key} {template!r} needs the variable {e.args[0]!r}; "
            f"known: {sorted(fields)} (pass --var {e.args[0]}=VALUE or a model with -m)"
        ) from None


def model_variables(dataset_name: str) -> dict[str, str]:
    """Template variables from nnU-Net's dataset name ``DatasetXXX_Name`` (``msd_task`` is MSD's ``TaskXX_Name``)."""
    m = re.fullmatch(r"Dataset(\d{3})_(.+)", dataset_name)
    if m is None:
        return {"dataset_name": dataset_name}
    num, name = int(m.group(1)), m.group(2)
    return {"dataset_id": f"{num:03d}", "dataset_name": name, "msd_task": f"Task{num:02d}_{name}"}


def available_profiles() -> dict[str, Path]:
    """Profile name -> file, for the profiles shipped in ``mim_nnunet/submission/profiles/``."""
    folder = resources.files("mim_nnunet.submission") / "profiles"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name or alias, or any profile file by path."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return Profile.from_dict(json.loads(p.read_text()), p)
    shipped = available_profiles()
    if str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
        return Profile.from_dict(json.loads(path.read_text()), path)
    for path in shipped.values():
        d = json.loads(path.read_text())
        if str(name_or_path) in d.get("aliases", ()):
            return Profile.from_dict(d, path)
    raise ProfileError(
        f"unknown profile {str(name_or_path)!r}; shipped: {sorted(shipped)} (or give a .json path)"
    )
