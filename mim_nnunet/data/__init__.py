"""Data: synthetic phantoms, input discovery, preprocessing into the blosc2 cache, random-crop loading.

Knows files and arrays, never the network (product.md, "Layout").
"""

from __future__ import annotations

from .loader import CropDataset
from .phantoms import (
    LABELS,
    LESION_LABELS,
    TASKS,
    lesion_report,
    make_phantom,
    write_nnunet_dataset,
    write_unlabeled_corpus,
)
from .preprocess import CorpusError, CorpusReport, PreprocessSettings, load_fingerprint, preprocess_corpus
from .sources import CaseSource, resolve_inputs

__all__ = [
    "LABELS",
    "LESION_LABELS",
    "TASKS",
    "CaseSource",
    "CorpusError",
    "CorpusReport",
    "CropDataset",
    "PreprocessSettings",
    "lesion_report",
    "load_fingerprint",
    "make_phantom",
    "preprocess_corpus",
    "resolve_inputs",
    "write_nnunet_dataset",
    "write_unlabeled_corpus",
]
