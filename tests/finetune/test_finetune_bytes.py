"""The fine-tune's bytes are the same on every x86-64 CPU: one step of the stage's own code on a tiny fixed input
must reproduce, bit for bit, the record committed in tests/records/finetune_step.json (made on an Intel Xeon; an AMD
EPYC must give the same). A failure names the first loss, gradient or weight that departs from the record.

After a deliberate change of the fine-tune's numerics: `python -m tests.finetune_step --write`, and commit the file.
"""
from __future__ import annotations

import json

import pytest

from pipeline.infra import numerics
from tests.finetune_step import RECORD, first_difference, step_record


@pytest.mark.slow
@pytest.mark.skipif(not (numerics.STATUS.get("pinned") and numerics.STATUS.get("mode") == numerics.PORTABLE),
                    reason="bytes are pinned only under portable numerics on an x86-64-v3 CPU "
                           f"({numerics.status_line(numerics.STATUS)})")
def test_one_finetune_step_matches_the_committed_record():
    expected = json.loads(RECORD.read_text())
    actual = step_record()
    where = first_difference(expected, actual)
    assert where is None, (f"this CPU ({numerics.cpu_model()}) departs from the committed fine-tune record at {where}: "
                           "a kernel of the training step depends on the CPU model (see README, 'Portable "
                           "numerics'), or the fine-tune's code changed (then rewrite the record)")


def test_first_difference_names_the_first_departure():
    step = {"loss": 1.0, "logits": "a", "grads": {"w1": "x", "w2": "y"}, "weights": {"w1": "p", "w2": "q"},
            "grad_sums": {"w1": 0.5, "w2": 0.25}}
    record = {"kernels": "PortableConvolutions", "steps": [step, step]}
    moved = json.loads(json.dumps(record))
    assert first_difference(record, moved) is None
    moved["steps"][1]["weights"]["w2"] = "z"
    moved["steps"][1]["grads"]["w2"] = "t"
    moved["steps"][1]["grad_sums"]["w2"] = 0.26
    assert first_difference(record, moved) == "step 2 gradient of w2 (sum 0.25 recorded, 0.26 here)"
    moved["steps"][0]["loss"] = 1.5
    assert first_difference(record, moved) == "step 1 loss: 1.0 recorded, 1.5 here"
