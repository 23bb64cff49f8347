"""The artifacts of a member's run and the columns of its predictions table."""

from __future__ import annotations

# --- artifacts ----------------------------------------------------------------
PREDICTIONS = "predictions.parquet"
MEMBER_FILE = "member.json"
STUDY_FILE = "study.yaml"

# --- the predictions table ----------------------------------------------------
EXAMPLE_ID = "example_id"
LABEL = "label"
PRED = "pred"
PROB = "prob"
REQUIRED_COLUMNS = (EXAMPLE_ID, LABEL, PRED)
#: Columns that are never group attributes.
NON_GROUP_COLUMNS = frozenset({EXAMPLE_ID, LABEL, PRED, PROB, "path"})
