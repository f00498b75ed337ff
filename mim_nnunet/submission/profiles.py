"""Challenge profiles: how a challenge names, labels, stores, lays out and scores its prediction files.

A profile is data (``profiles/<name>.json``), never a code branch: adding a challenge is adding a file. This module
owns loading and checking those files, turning an input image name into the file name the challenge expects, and
reading the label values an nnU-Net model writes. It must not import nnU-Net or any pre-training code.

Fields of a profile file (see ``docs/submission.md``):

- ``name``, ``title``, ``source`` (one-line summary), ``sources`` ({convention: repository path or page URL}),
  ``notes``, optional ``aliases``, ``rules`` (challenge rules a team must know before choosing this tool).
- ``input.pattern``: a regex matched against each test image's file name. The named group ``case`` is the case
  id; the optional group ``channel`` is nnU-Net's ``_XXXX`` channel suffix; every other named group can be used in
  the output templates.
- ``output.name``: a ``str.format`` template for the prediction file name (fields: the regex groups plus the
  variables below). ``output.folder``: a template for the folder the predictions go into ("" = top level).
  ``output.file_ending``: the format (``.nii.gz``, ``.mha``, ...; ``null`` keeps the input's ending).
  ``output.dtype``: the integer pixel type written. ``output.zip_root``: a folder every zip member lies under
  (AMOS22's ``results/``; "" = the zip root).
- ``labels``: ``{value: name}`` of the challenge's label set, or ``null`` to take the label set from the model's
  ``dataset.json`` (after ``label_map``).
- ``label_map``: optional ``{model value: challenge value}``; values not listed map to themselves.
- ``evaluation``: how the challenge scores (targets = labels or hierarchical regions with their own NSD
  tolerance, empty-mask convention, FLARE's Dice floor and z-range crop, which targets the mean leaves out).
- ``container``: the challenge's container convention (input/output folders under a root, the run command).

Template variables besides the regex groups: ``ending`` (the input's file ending), ``dataset_id``,
``dataset_name`` (nnU-Net's ``DatasetXXX_Name`` split), ``msd_task`` (``TaskXX_Name``), and any ``--var K=V``.
Every formatted output path must stay inside the output folder (no ``..``, no absolute path).
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

log = logging.getLogger(__name__)

# The endings nnU-Net's readers handle (SimpleITKIO, NaturalImage2DIO, Tiff3DIO), longest first so ".nii.gz"
# wins over ".nii"-less matches.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".bmp", ".tiff", ".tif")
INTEGER_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")
EMPTY_CONVENTIONS = ("nan", "one")
_TEMPLATE_GROUPS = {"case", "channel"}


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
class Target:
    """One scored structure: a label (one value) or a region (the union of several values)."""

    name: str
    labels: tuple[int, ...]
    tolerance_mm: float | None = None
    # FLARE scores aorta, IVC and oesophagus only on the slices the reference labels (see evaluate.py).
    reference_z_range: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """How results name the target: the label value, or the values joined by '+' for a region."""
        return "+".join(str(v) for v in self.labels)


@dataclass(frozen=True)
class EvaluationSpec:
    targets: tuple[Target, ...]
    # "one": both masks empty scores 1 (Dice and NSD), one empty scores 0 (KiTS23, FLARE);
    # "nan": both empty is NaN and left out of the means (nnU-Net's evaluate_folder).
    empty: str = "nan"
    nsd_zero_below_dice: float | None = None
    mean_excludes: tuple[str, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class ContainerSpec:
    """Where a challenge's container finds the test images and leaves the predictions.

    ``input``/``output`` are relative to ``root``; ``root`` "." means the working directory the challenge runs
    the command in."""

    input: str
    output: str
    root: str = "/"
    command: str = ""
    source: str = ""


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
    sources: dict[str, str] = field(default_factory=dict)
    zip_root: str = ""
    evaluation: EvaluationSpec | None = None
    container: ContainerSpec | None = None
    rules: tuple[str, ...] = ()

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
        zip_root = out.get("zip_root", "").strip("/")
        if zip_root:
            check_relpath(zip_root, f"{where}: output.zip_root")
        sources = d.get("sources", {})
        if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
            raise ProfileError(f"{where}: sources must map a convention to a citation string")
        rules = d.get("rules", [])
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise ProfileError(f"{where}: rules must be a list of sentences")
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
            sources=dict(sources),
            zip_root=zip_root,
            evaluation=_evaluation_from_dict(d.get("evaluation"), labels, where),
            container=_container_from_dict(d.get("container"), where),
            rules=tuple(rules),
        )

    # ---- naming -------------------------------------------------------------------------------------------------
    def match(self, file_name: str) -> re.Match | None:
        return re.fullmatch(self.input_pattern, file_name)

    def collect_cases(self, images_dir: str | Path, n_channels: int | None = None) -> list[Case]:
        """Group the image files of a folder into cases (channels sorted), as the profile's pattern reads them.

        Files whose name starts with '.' or '_' are skipped, as nnU-Net's dataset converters skip them (macOS
        writes ``._name.nii.gz`` AppleDouble files next to every image on foreign file systems).

        A trailing ``_XXXX`` is ambiguous: nnU-Net's channel suffix, or part of the case id (``amos_0001``,
        ``FLARE22_Tr_0001``). It is read as a channel only when that gives every case the channels 0..k-1 (and
        k = ``n_channels`` when the model's channel count is known); otherwise, for a pattern without other named
        groups, every file is a single-channel case named after the whole file name.
        """
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise ProfileError(f"images folder {images_dir} does not exist")
        files, skipped = [], []
        for p in sorted(images_dir.iterdir()):
            if not p.is_file() or not p.name.lower().endswith(IMAGE_ENDINGS):
                continue
            if p.name.startswith((".", "_")):
                skipped.append(p.name)
                continue
            files.append(p)
        if skipped:
            log.warning(
                "skipped %d hidden file(s) in %s (names starting with '.' or '_'): %s",
                len(skipped),
                images_dir,
                ", ".join(skipped[:5]),
            )
        if not files:
            raise ProfileError(
                f"images folder {images_dir} holds no image files ({', '.join(IMAGE_ENDINGS)})"
            )
        parsed = []
        for p in files:
            m = self.match(p.name)
            if m is None:
                raise ProfileError(
                    f"{p.name}: does not match the input pattern of profile '{self.name}' ({self.input_pattern})"
                )
            parsed.append((p, {k: v for k, v in m.groupdict().items() if v is not None}))
        by_case: dict[str, list[tuple[int, Path, dict]]] = {}
        for p, groups in parsed:
            by_case.setdefault(groups["case"], []).append((int(groups.get("channel", 0)), p, groups))
        bad = _channel_problems(by_case, n_channels)
        can_fall_back = not (set(re.compile(self.input_pattern).groupindex) - _TEMPLATE_GROUPS)
        # A case with channels 0..k-1, k >= 2, is evidence of nnU-Net's multi-channel naming: then a gap
        # elsewhere is an error, unless the model says there is one channel.
        multi_channel = any(
            len(e) >= 2 and sorted(c for c, _, _ in e) == list(range(len(e))) for e in by_case.values()
        )
        if bad and can_fall_back and (n_channels == 1 or (n_channels is None and not multi_channel)):
            # The suffixes are not channels: each file is its own single-channel case.
            by_case = {}
            for p, _ in parsed:
                stem = p.name[: -len(_ending_of(p.name))]
                by_case[stem] = [(0, p, {"case": stem})]
            bad = []
        if bad:
            raise ProfileError(bad[0])
        cases = []
        for case_id, entries in sorted(by_case.items()):
            entries.sort(key=lambda e: e[0])
            first = entries[0][1].name
            cases.append(Case(case_id, tuple(e[1] for e in entries), entries[0][2], _ending_of(first)))
        return cases

    def output_relpath(self, case: Case, variables: dict[str, str] | None = None) -> str:
        """The prediction's path relative to the submission root, e.g. ``Task04_Hippocampus/hippocampus_267.nii.gz``.

        Raises if the formatted path would leave the output folder (``..``, an absolute path)."""
        fields = {**(variables or {}), **case.groups, "case": case.case_id, "ending": case.ending}
        ending = self.file_ending or case.ending
        name = _format(self.output_name, fields, self.name, "output.name")
        if not name.endswith(ending):
            name += ending
        folder = _format(self.output_folder, fields, self.name, "output.folder").strip("/")
        rel = f"{folder}/{name}" if folder else name
        return check_relpath(rel, f"profile '{self.name}': output path for case {case.case_id}")

    # ---- labels -------------------------------------------------------------------------------------------------
    def allowed_labels(self, model_dataset: dict | None = None) -> set[int]:
        """The label values a valid prediction may contain.

        ``model_dataset`` is the model's dataset.json (or only its ``labels`` entry); the values the model writes
        (see :func:`written_labels`) are used, through ``label_map``, when the profile has no label set of its own.
        """
        if self.labels is not None:
            return set(self.labels)
        if model_dataset is None:
            raise ProfileError(
                f"profile '{self.name}' takes its label set from the model: pass a model (-m) or --labels"
            )
        return {self.map_label(v) for v in written_labels(model_dataset).values()}

    def map_label(self, value: int) -> int:
        return self.label_map.get(value, value)

    def label_map_by_name(self, model_dataset: dict, keep: set[int] = frozenset()) -> dict[int, int]:
        """{model value: challenge value} pairing the model's label names with the profile's.

        Names compare case-, space-, '_' and '-'-insensitively ("Gall_Bladder" = "gallbladder"). Challenges
        number the same organs differently (BTCV liver 6, FLARE22 liver 1); this is the map between them.
        Model values in ``keep`` are left to an explicit map. An unmatched name is an error.

        A region-trained model (dataset.json regions + ``regions_class_order``, e.g. nnU-Net's
        Dataset220_KiTS2023) is matched region by region against the profile's evaluation regions: each label
        value is identified by the set of regions that contain it, on both sides.
        """
        if self.labels is None:
            raise ProfileError(
                f"profile '{self.name}' has no label names to match (its labels come from the model)"
            )
        labels = (
            model_dataset.get("labels", model_dataset) if _is_dataset_json(model_dataset) else model_dataset
        )
        if _has_regions(labels):
            return {k: v for k, v in self._region_label_map(model_dataset).items() if k not in keep}
        by_name = {_norm(n): v for v, n in self.labels.items()}
        out, unmatched = {}, []
        for name, value in labels.items():
            value = int(value)
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

    def _region_label_map(self, model_dataset: dict) -> dict[int, int]:
        regions = model_regions(model_dataset)
        targets = [t for t in (self.evaluation.targets if self.evaluation else ()) if len(t.labels) >= 1]
        by_name = {_norm(n): t for t in targets for n in (t.name, *t.aliases)}
        matched, unmatched = {}, []
        for name, region in regions.items():
            t = by_name.get(_norm(name))
            if t is None:
                unmatched.append(f"{name} {list(region)}")
            else:
                matched[name] = t
        if unmatched:
            raise ProfileError(
                f"profile '{self.name}': model regions {unmatched} have no namesake among the profile's regions "
                f"{[t.name for t in targets]}; map them with --label-map SRC:DST"
            )
        # A label value is identified by the regions that contain it (kidney 1: {kidney}; tumor 2: all three).
        model_sig: dict[int, frozenset] = {}
        for name, region in regions.items():
            for v in region:
                model_sig[v] = model_sig.get(v, frozenset()) | {matched[name].name}
        used = {matched[n].name for n in regions}
        prof_sig: dict[frozenset, list[int]] = {}
        for v in {v for t in targets if t.name in used for v in t.labels}:
            sig = frozenset(t.name for t in targets if t.name in used and v in t.labels)
            prof_sig.setdefault(sig, []).append(v)
        out = {0: 0}
        for v, sig in model_sig.items():
            dst = prof_sig.get(sig, [])
            if len(dst) != 1:
                raise ProfileError(
                    f"profile '{self.name}': model label {v} lies in regions {sorted(sig)}, which match "
                    f"{'no' if not dst else 'several'} challenge labels {dst}; map it with --label-map"
                )
            out[v] = dst[0]
        written = written_labels(model_dataset).values()
        stray = sorted(set(written) - set(out))
        if stray:
            raise ProfileError(
                f"profile '{self.name}': regions_class_order writes {stray}, which no model region contains"
            )
        return {v: out[v] for v in written}

    @property
    def scores_regions(self) -> bool:
        """True when the challenge scores regions (an evaluation target of several labels, KiTS23's)."""
        return self.evaluation is not None and any(len(t.labels) > 1 for t in self.evaluation.targets)

    def check_model_labels(self, model_dataset: dict, keep: set[int] = frozenset(), where: str = "model") -> None:
        """Refuse a model whose written values would mean other structures than the profile's labels.

        What a profile expects (docs/submission.md, "Plain labels and regions"): ``labels: null`` takes any model;
        a profile with its own labels that scores no region (BTCV, AMOS22, FLARE) expects plain labels, so a
        region-trained model is refused; a region-scored profile (KiTS23) takes either kind when the values mean
        its labels: a region model's regions pair with its regions by name (values unchanged), a plain model's
        label names are its names at the same values. Values in ``keep`` (an explicit --label-map) are the user's
        word and not checked; ``where`` names the model's dataset.json in the message.
        """
        if self.labels is None:
            return
        labels = model_dataset["labels"] if _is_dataset_json(model_dataset) else model_dataset
        written = {n: v for n, v in written_labels(model_dataset).items() if v != 0 and v not in keep}
        if not written:
            return
        hint = "pass --map-labels-by-name or --label-map SRC:DST for every value"
        if _has_regions(labels):
            regions = ", ".join(f"{n} {list(r)}" for n, r in model_regions(model_dataset).items())
            if not self.scores_regions:
                raise ProfileError(
                    f"{where}: a region-trained model (regions {regions}; writes {sorted(written.values())}), "
                    f"but profile '{self.name}' expects plain labels {self.labels}; expected a model trained on "
                    f"plain labels, or {hint}"
                )
            try:
                pairs = self._region_label_map(model_dataset)
            except ProfileError as e:
                raise ProfileError(f"{where}: {e}") from None
            moved = {v: pairs[v] for v in written.values() if pairs.get(v, v) != v}
            if moved:
                v, w = next(iter(moved.items()))
                raise ProfileError(
                    f"{where}: the model writes {v} where profile '{self.name}' expects {w} "
                    f"({self.labels.get(w)}, paired by region names; regions {regions}); {hint}"
                )
            return
        if not self.scores_regions:
            return  # plain labels on a plain-label profile: numbered as the model was trained (or --label-map)
        for name, v in written.items():
            if _norm(self.labels.get(v, "")) != _norm(name):
                meant = f"{v} to be {self.labels[v]!r}" if v in self.labels else f"no label {v}"
                raise ProfileError(
                    f"{where}: model label {name!r} = {v}, but profile '{self.name}' (scored on regions of its "
                    f"labels) expects {meant}: expected labels {self.labels}; {hint}"
                )


def check_relpath(rel: str, what: str) -> str:
    """``rel`` if it is a relative path that stays below its root, else a ProfileError naming ``what``."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or PurePosixPath(rel).is_absolute()
        or re.match(r"^[A-Za-z]:", rel)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ProfileError(
            f"{what}: {rel!r} is not a plain relative path inside the output folder "
            "(no '..', '.', empty or absolute parts); check --var values, the profile's templates and the model's "
            "dataset name"
        )
    return rel


def _channel_problems(by_case: dict, n_channels: int | None) -> list[str]:
    out = []
    for case_id, entries in sorted(by_case.items()):
        channels = sorted(e[0] for e in entries)
        if channels != list(range(len(channels))):
            names = ", ".join(e[1].name for e in sorted(entries, key=lambda e: e[0]))
            out.append(f"case {case_id}: channels {channels} are not 0..{len(channels) - 1} ({names})")
        elif n_channels is not None and len(channels) != n_channels:
            names = ", ".join(e[1].name for e in sorted(entries, key=lambda e: e[0]))
            out.append(
                f"case {case_id}: {len(channels)} channel(s), the model expects {n_channels} ({names})"
            )
    return out


def _ending_of(name: str) -> str:
    return next(e for e in IMAGE_ENDINGS if name.lower().endswith(e))


def _evaluation_from_dict(d: dict | None, labels: dict[int, str] | None, where: str) -> EvaluationSpec | None:
    if d is None:
        return None
    targets = []
    for i, t in enumerate(d.get("targets", [])):
        try:
            values = tuple(int(v) for v in t["labels"])
            tol = t.get("tolerance_mm")
            target = Target(
                name=str(t["name"]),
                labels=values,
                tolerance_mm=None if tol is None else float(tol),
                reference_z_range=bool(t.get("reference_z_range", False)),
                aliases=tuple(t.get("aliases", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(
                f"{where}: evaluation.targets[{i}] needs name, labels (integers): {e}"
            ) from None
        if not values or 0 in values:
            raise ProfileError(
                f"{where}: evaluation target {target.name!r} labels {list(values)} must be non-zero"
            )
        if labels is not None and set(values) - set(labels):
            raise ProfileError(
                f"{where}: evaluation target {target.name!r} uses {sorted(set(values) - set(labels))}, "
                f"not in the profile's labels {sorted(labels)}"
            )
        if target.tolerance_mm is not None and not target.tolerance_mm > 0:
            raise ProfileError(f"{where}: evaluation target {target.name!r} tolerance_mm must be > 0")
        targets.append(target)
    empty = d.get("empty", "nan")
    if empty not in EMPTY_CONVENTIONS:
        raise ProfileError(f"{where}: evaluation.empty {empty!r} is not one of {EMPTY_CONVENTIONS}")
    excludes = tuple(d.get("mean_excludes", ()))
    unknown = set(excludes) - {t.name for t in targets}
    if unknown:
        raise ProfileError(f"{where}: evaluation.mean_excludes names unknown targets {sorted(unknown)}")
    floor = d.get("nsd_zero_below_dice")
    return EvaluationSpec(
        targets=tuple(targets),
        empty=empty,
        nsd_zero_below_dice=None if floor is None else float(floor),
        mean_excludes=excludes,
        source=str(d.get("source", "")),
    )


def _container_from_dict(d: dict | None, where: str) -> ContainerSpec | None:
    if d is None:
        return None
    try:
        spec = ContainerSpec(
            input=str(d["input"]),
            output=str(d["output"]),
            root=str(d.get("root", "/")),
            command=str(d.get("command", "")),
            source=str(d.get("source", "")),
        )
    except KeyError as e:
        raise ProfileError(f"{where}: container needs {e.args[0]!r}") from None
    for key in ("input", "output"):
        check_relpath(getattr(spec, key), f"{where}: container.{key}")
    return spec


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def _is_dataset_json(d: dict) -> bool:
    return isinstance(d.get("labels"), dict)


def _has_regions(labels: dict) -> bool:
    # nnU-Net's LabelManager: region-based when any label entry is a tuple/list of more than one value.
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())


def model_regions(model_dataset: dict) -> dict[str, tuple[int, ...]]:
    """{name: region} of a region-trained model's foreground regions, in dataset.json order (nnU-Net's order)."""
    labels = model_dataset["labels"] if _is_dataset_json(model_dataset) else model_dataset
    out = {}
    for name, r in labels.items():
        if name == "ignore":
            continue
        values = tuple(int(v) for v in r) if isinstance(r, (list, tuple)) else (int(r),)
        if set(values) == {0}:
            continue
        out[name] = values
    return out


def written_labels(model_dataset: dict) -> dict[str, int]:
    """{name: value} of the values an nnU-Net model writes into its segmentation files, background included.

    Plain labels write their value. A region-trained model writes ``regions_class_order[i]`` for its i-th
    foreground region (nnU-Net's ``LabelManager.convert_probabilities_to_segmentation``), not any member of the
    region: Dataset220_KiTS2023 (kidney (1,2,3), masses (2,3), tumor 2; order (1,3,2)) writes 1, 3 and 2.
    """
    labels = model_dataset["labels"] if _is_dataset_json(model_dataset) else model_dataset
    if not _has_regions(labels):
        return {
            name: int(v[0] if isinstance(v, (list, tuple)) else v)
            for name, v in labels.items()
            if name != "ignore"
        }
    order = model_dataset.get("regions_class_order") if _is_dataset_json(model_dataset) else None
    regions = model_regions(model_dataset)
    if order is None or len(order) != len(regions):
        raise ProfileError(
            f"region-based model labels {labels}: dataset.json needs regions_class_order with one value per "
            f"foreground region ({len(regions)}), got {order}"
        )
    out = {"background": 0}
    out.update({name: int(c) for name, c in zip(regions, order)})
    return out


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
