"""Bad input to ``compbias register`` (bring your own predictions), through the command line.

Each case checks what the user sees (exit 2, one line on stderr that names the
problem and what to do, no traceback) and what MLflow is left with: no new
registered version, no run left RUNNING, and for input refused before
writing, no new run at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform import cli
from tests.reliability.conftest import census

N = 40


def frame(*, noise_seed: int = 0, **changes) -> pd.DataFrame:
    rng = np.random.default_rng(noise_seed)
    y = np.arange(N) % 2
    pred = np.where(rng.random(N) < 0.2, 1 - y, y)
    out = pd.DataFrame({"example_id": np.arange(N), "label": y, "pred": pred, "large": (np.arange(N) % 3 == 0).astype(int)})
    for col, value in changes.items():
        out[col] = value
    return out


@pytest.fixture
def store(tmp_path, monkeypatch, capsys):
    """A store holding one registered baseline (seed 0) of study ``tab`` in ``tab-mlp``: version 1."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("COMPBIAS_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "base.csv"
    frame().to_csv(path, index=False)
    code = cli.main(["register", str(path), "--study", "tab", "--role", "baseline", "--seed", "0", "--registered-model",
                     "tab-mlp", "--class-names", "benign,malignant", "--positive-class", "malignant", "--tracking-uri", uri])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "tab-mlp version 1" in out.out
    return {"uri": uri, "tmp": tmp_path}


def register(capsys, store, table, *args: str, name: str = "member.csv", write=True):
    path = store["tmp"] / name
    if write:
        if name.endswith(".parquet"):
            table.to_parquet(path, index=False)
        else:
            table.to_csv(path, index=False)
    before = census(store["uri"])
    try:
        code = cli.main(["register", str(path), "--registered-model", "tab-mlp", "--tracking-uri", store["uri"], *args])
    except SystemExit as exc:  # argparse refuses bad usage itself (exit 2, usage and one error line)
        code = exc.code
    said = capsys.readouterr()
    return code, said.err, before


def assert_refused(code, err, before, store, *fragments, runs_added=0):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith(("compbias register: ", "compbias register: error: ")), err
    assert len([ln for ln in lines if ln.startswith("compbias register")]) == 1, err
    for f in fragments:
        assert f in err, (f, err)
    after = census(store["uri"])
    assert [(v.name, v.version) for v in after.versions] == [(v.name, v.version) for v in before.versions]
    assert "RUNNING" not in after.statuses(), after.statuses()
    assert len(after.runs) == len(before.runs) + runs_added


COMPRESSED = ("--study", "tab", "--role", "compressed", "--seed", "0", "--method", "int8", "--level", "dynamic",
              "--baseline-version", "1")


def test_mismatched_example_ids_are_refused(capsys, store):
    code, err, before = register(capsys, store, frame(example_id=np.arange(N) + 5), *COMPRESSED)
    assert_refused(code, err, before, store, "predicts other examples", "same test examples")


def test_labels_that_differ_from_the_baseline_are_refused(capsys, store):
    y = np.arange(N) % 2
    y[3] = 1 - y[3]
    code, err, before = register(capsys, store, frame(label=y), *COMPRESSED)
    assert_refused(code, err, before, store, "labels disagree", "example_id 3", "share the ground truth")


def test_a_baseline_of_the_same_study_must_agree_with_the_first_baseline(capsys, store):
    code, err, before = register(capsys, store, frame(example_id=np.arange(N) * 2),
                                 "--study", "tab", "--role", "baseline", "--seed", "1")
    assert_refused(code, err, before, store, "predicts other examples", "version 1 of tab-mlp")


def test_a_compressed_member_whose_baseline_is_missing_is_refused(capsys, store):
    args = [a if a != "1" else "9" for a in COMPRESSED]
    code, err, before = register(capsys, store, frame(), *args)
    assert_refused(code, err, before, store, "baseline version 9", "does not exist", "register the baseline first")
    code, err, before = register(capsys, store, frame(), *COMPRESSED[:-2], "--baseline-run-id", "0" * 32)
    assert_refused(code, err, before, store, "no version of registered model 'tab-mlp' comes from the baseline run")
    code, err, before = register(capsys, store, frame(), *COMPRESSED[:-2])
    assert_refused(code, err, before, store, "needs the baseline it came from")


def test_a_compressed_member_of_another_seed_than_its_baseline_is_refused(capsys, store):
    args = list(COMPRESSED)
    args[args.index("--seed") + 1] = "4"
    code, err, before = register(capsys, store, frame(), *args)
    assert_refused(code, err, before, store, "has seed 0, this member seed 4")


def test_a_prediction_out_of_range_is_refused(capsys, store):
    pred = frame()["pred"].to_numpy().copy()
    pred[7] = 2  # the population has 2 classes (the baseline's member.json)
    code, err, before = register(capsys, store, frame(pred=pred), *COMPRESSED)
    assert_refused(code, err, before, store, "pred value(s) out of range", "for 2 classes")
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--num-classes", "3")
    assert_refused(code, err, before, store, "num_classes 3 differs from the population's 2")
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--num-classes", "1")
    assert_refused(code, err, before, store, "num_classes must be an integer of at least 2, got 1")


def test_facts_that_contradict_the_population_are_refused(capsys, store):
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--positive-class", "benign")
    assert_refused(code, err, before, store, "positive_class 0 differs from the population's 1", "leave positive_class out")
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--class-names", "b,m")
    assert_refused(code, err, before, store, "class_names ['b', 'm'] differs from the population's ['benign', 'malignant']")
    code, err, before = register(capsys, store, frame(other=1), *COMPRESSED, "--groups", "large,other")
    assert_refused(code, err, before, store, "groups ['large', 'other'] differs from the population's ['large']")


def test_duplicated_rows_are_refused(capsys, store):
    dup = pd.concat([frame(), frame().iloc[[5]]])
    code, err, before = register(capsys, store, dup, *COMPRESSED, name="dup.parquet")
    assert_refused(code, err, before, store, "duplicated example_id", "one row per example")


def test_missing_role_and_missing_lineage_are_refused(capsys, store):
    code, err, before = register(capsys, store, frame(), "--study", "tab", "--seed", "1")
    assert_refused(code, err, before, store, "--role")
    code, err, before = register(capsys, store, frame(), "--study", "tab", "--role", "compressed", "--seed", "0",
                                 "--baseline-version", "1")
    assert_refused(code, err, before, store, "needs its method and level")
    code, err, before = register(capsys, store, frame(), "--study", "tab", "--role", "baseline", "--seed", "1",
                                 "--method", "int8")
    assert_refused(code, err, before, store, "a baseline takes no --method")


def test_bad_files_columns_and_classes_are_refused(capsys, store):
    code, err, before = register(capsys, store, None, *COMPRESSED, name="absent.csv", write=False)
    assert_refused(code, err, before, store, "no predictions file", ".parquet or .csv")
    (store["tmp"] / "table.txt").write_text("example_id,label,pred\n")
    code, err, before = register(capsys, store, None, *COMPRESSED, name="table.txt", write=False)
    assert_refused(code, err, before, store, "must end in .parquet or .csv")
    code, err, before = register(capsys, store, frame().drop(columns=["pred"]), *COMPRESSED)
    assert_refused(code, err, before, store, "lacks the column(s) ['pred']")
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--groups", "sex")
    assert_refused(code, err, before, store, "lacks the group column 'sex'")
    code, err, before = register(capsys, store, frame(), "--study", "tab2", "--role", "baseline", "--seed", "0",
                                 "--class-names", "a,b", "--positive-class", "c")
    assert_refused(code, err, before, store, "class 'c' is not a class id in [0, 2) nor a class name ['a', 'b']")


def test_a_member_registered_twice_is_refused(capsys, store):
    code, err, before = register(capsys, store, frame(), "--study", "tab", "--role", "baseline", "--seed", "0")
    assert_refused(code, err, before, store, "already version 1 of tab-mlp", "registered once")


def test_an_unreachable_model_uri_is_refused(capsys, store):
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--model-uri", f"runs:/{'0' * 32}/model")
    assert_refused(code, err, before, store, "model_uri", "cannot be reached")
    code, err, before = register(capsys, store, frame(), *COMPRESSED, "--model-uri", "models:/m-0123456789abcdef")
    assert_refused(code, err, before, store, "model_uri", "cannot be reached")


def test_a_failing_registration_leaves_no_version_and_no_member_run(capsys, store, monkeypatch):
    def refuse(self, *a, **k):
        raise MlflowException("the registry is read-only")

    monkeypatch.setattr(MlflowClient, "create_model_version", refuse)
    code, err, before = register(capsys, store, frame(noise_seed=1), *COMPRESSED)
    assert_refused(code, err, before, store, "failed while writing", "the registry is read-only", "nothing was kept",
                   runs_added=1)
    run = next(r for r in census(store["uri"]).runs if r.info.run_id not in {b.info.run_id for b in before.runs})
    assert run.info.status == "FAILED" and C.STUDY not in run.data.tags and C.ROLE not in run.data.tags
    assert "read-only" in run.data.tags[C.ERROR]


def test_a_version_created_by_a_call_that_then_fails_is_deleted(capsys, store, monkeypatch):
    create = MlflowClient.create_model_version

    def create_then_time_out(self, *a, **k):
        create(self, *a, **k)
        raise MlflowException("timed out waiting for the version to become READY")

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_time_out)
    code, err, before = register(capsys, store, frame(noise_seed=2), *COMPRESSED)
    assert_refused(code, err, before, store, "timed out waiting", "nothing was kept", runs_added=1)


def test_a_good_compressed_member_after_refusals_is_registered(capsys, store):
    """The refusals above leave the store usable: the same member, fixed, registers as version 2."""
    code, err, _ = register(capsys, store, frame(example_id=np.arange(N) + 5), *COMPRESSED)
    assert code == 2
    code, err, _ = register(capsys, store, frame(noise_seed=3), *COMPRESSED)
    assert code == 0, err
    mv = MlflowClient(store["uri"], store["uri"]).get_model_version("tab-mlp", "2")
    assert mv.tags[C.ROLE] == "compressed" and mv.tags[C.BASELINE_VERSION] == "1" and mv.tags[C.BASELINE_RUN_ID]


def test_a_tracking_server_that_does_not_answer_is_one_line_and_fast(capsys, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    path = tmp_path / "p.csv"
    frame().to_csv(path, index=False)
    t0 = time.perf_counter()
    code = cli.main(["register", str(path), "--study", "tab", "--role", "baseline", "--seed", "0",
                     "--registered-model", "tab-mlp", "--tracking-uri", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - t0 < 30
    assert err.strip().startswith("compbias register: the tracking server") and "does not answer" in err
    assert len(err.strip().splitlines()) == 1
