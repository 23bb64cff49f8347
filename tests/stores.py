"""Copies of MLflow SQLite stores for tests.

Registering a study takes seconds, so fixtures build a store once per session
and give every test its own copy; the copy's absolute artifact paths are
rewritten to point into the copy.
"""

import shutil
import sqlite3
from pathlib import Path

# columns of MLflow's SQLite schema that hold absolute artifact paths
PATH_COLUMNS = {
    "experiments": ["artifact_location"],
    "runs": ["artifact_uri"],
    "model_versions": ["source", "storage_location"],
    "logged_models": ["artifact_location"],
}


def copy_store(src: Path, dst: Path) -> None:
    """Copy a store directory (``mlflow.db`` + artifacts) and rewrite its absolute paths."""
    shutil.copytree(src, dst)
    con = sqlite3.connect(dst / "mlflow.db")
    try:
        for table, cols in PATH_COLUMNS.items():
            for col in cols:
                con.execute(f"UPDATE {table} SET {col} = replace({col}, ?, ?) WHERE {col} IS NOT NULL", (str(src), str(dst)))
        con.commit()
    finally:
        con.close()
