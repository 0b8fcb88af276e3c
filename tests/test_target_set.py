"""The evaluation target set read back from ingested shards: identities of labeled and unlabeled rows.

Inputs: a CSV manifest of tiny real JPEGs (Pillow), ingested in-process. Expected values are written
out by hand from the rows below."""

from __future__ import annotations

import numpy as np

from dynamix_core.data.transforms import TransformConfig
from dynamix_core.evaluation import evaluate_features
from pipelines.ingest import IngestConfig, run_ingest
from dynamix_core.evaluation.target import TargetSet
from test_ingest import image_bytes

# path, pid (-1 = unlabeled), camid, split
ROWS = [
    ("q_a.jpg", 1, 1, "query"), ("q_u1.jpg", -1, 1, "query"), ("q_u2.jpg", -1, 2, "query"),
    ("g_a.jpg", 1, 2, "gallery"), ("g_b.jpg", 2, 2, "gallery"), ("g_u1.jpg", -1, 2, "gallery"),
    ("g_u2.jpg", -1, 3, "gallery"),
]


def test_unlabeled_rows_are_nobodys_positive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = ["path,pid,camid,split"]
    for i, (name, pid, cam, split) in enumerate(ROWS):
        (src / name).write_bytes(image_bytes(i))
        lines.append(f"{name},{pid},{cam},{split}")
    (src / "list.csv").write_text("\n".join(lines) + "\n")
    run_ingest(IngestConfig(root=src / "list.csv", out=tmp_path / "shards", workers=0), progress=False)

    target = TargetSet.load(str(tmp_path / "shards"), TransformConfig())
    # rows come back in key order: query q_a, q_u1, q_u2; gallery g_a, g_b, g_u1, g_u2
    q_pid, g_pid = target.q_pid.tolist(), target.g_pid.tolist()
    assert q_pid[0] == g_pid[0] and g_pid[0] != g_pid[1]  # labeled: pid 1 on both sides, pid 2 another
    unlabeled = [q_pid[1], q_pid[2], g_pid[2], g_pid[3]]
    assert len(set(unlabeled)) == 4 and not set(unlabeled) & {g_pid[0], g_pid[1]}

    # With every image at the same feature, only queries with a cross-camera positive are valid:
    # q_a (pid 1, cam 1 -> g_a, cam 2). Before the fix the two unlabeled queries were valid too.
    feat = np.ones((1, 4), dtype=np.float32)
    res = evaluate_features(np.repeat(feat, 3, 0), np.repeat(feat, 4, 0), target.q_pid, target.g_pid,
                            target.q_cam, target.g_cam)
    assert res["num_valid_queries"] == 1
