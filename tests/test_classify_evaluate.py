"""``mim_nnunet_classify evaluate``: metrics against scikit-learn and against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from mim_nnunet.classify.dataset import DatasetError
from mim_nnunet.classify.evaluate import classification_metrics, evaluate
from mim_nnunet.classify.predict import write_table
from mim_nnunet.cli.classify import main

CLASSES = ["a", "b", "c"]
# six cases, two per class; the prediction (argmax) is a a b b c a -> 5 of 6 right, the last 'c' called 'a'
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])


def write_example(tmp_path, y=Y, p=P, classes=CLASSES):
    rows = [{"case": f"c{i}", "class": classes[int(np.argmax(r))]} | {f"p_{k}": float(v) for k, v in zip(classes, r)}
            for i, r in enumerate(p)]  # fmt: skip
    write_table(tmp_path / "predictions.csv", rows, classes)
    (tmp_path / "ref.csv").write_text("case,class\n" + "".join(f"c{i},{classes[k]}\n" for i, k in enumerate(y)))
    return tmp_path / "predictions.csv", tmp_path / "ref.csv"


def test_the_metrics_are_sklearns_and_the_hand_worked_values(tmp_path):
    pred, ref = write_example(tmp_path)
    m = evaluate(pred, ref, tmp_path / "out" / "metrics.json")
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [1, 0, 1]]
    # F1: a = 2*2/(2*2+1) = 0.8, b = 1, c = 2*1/(2*1+1) = 2/3
    assert [m["per_class"][k]["f1"] for k in CLASSES] == pytest.approx([0.8, 1.0, 2 / 3])
    assert m["f1_macro"] == pytest.approx((0.8 + 1 + 2 / 3) / 3)
    # class c vs rest: scores 0.8, 0.4 (c) against 0.1 0.2 0.2 0.3 (rest): every pair ordered -> 1.0
    assert m["per_class"]["c"]["auroc"] == pytest.approx(1.0)
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(Y, P, multi_class="ovr", average="macro"))
    assert m["auroc_macro"] == pytest.approx(np.mean([roc_auc_score(Y == k, P[:, k]) for k in range(3)]))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y, P.argmax(1)))
    assert m["f1_macro"] == pytest.approx(f1_score(Y, P.argmax(1), average="macro"))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"] == pytest.approx(5 / 6)
    for png in ("confusion.png", "roc.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_two_classes_and_a_class_missing_from_the_reference():
    y, p = np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    m = classification_metrics(y, p, ["neg", "pos"])
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p[:, 1])) == pytest.approx(0.75)
    assert m["per_class"]["neg"]["auroc"] == pytest.approx(0.75)
    m3 = classification_metrics(np.array([0, 0, 1, 1]), P[:4], CLASSES)  # no case of class c
    assert m3["per_class"]["c"]["auroc"] is None and m3["per_class"]["c"]["support"] == 0
    assert m3["auroc_macro"] == pytest.approx(np.mean([m3["per_class"][k]["auroc"] for k in "ab"]))


def test_a_reference_case_without_a_prediction_is_an_error_naming_it(tmp_path, capsys):
    pred, ref = write_example(tmp_path)
    ref.write_text(ref.read_text() + "c9,a\n")
    with pytest.raises(DatasetError, match="case c9"):
        evaluate(pred, ref, tmp_path / "metrics.json")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "-p", str(pred), "-r", str(ref), "-o", str(tmp_path / "metrics.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "c9" in err and "\n" not in err
    assert not (tmp_path / "metrics.json").exists()
