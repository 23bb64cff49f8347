"""Each model's CEV/SDE inside the bootstrap: one kernel call for all rows, the values of compbias.metrics.cev/sde."""

import math

import numpy as np

import compbias.metrics as M
from compbias.platform.audit.intervals import _model_bias


def test_rows_equal_cev_and_sde_of_each_row_and_nan_where_they_refuse():
    nan = float("nan")
    dfpr = np.array([[10.0, -10.0, nan],   # hand: CEV 100 (see metrics.cev's example), SDE over 2 classes
                     [10.0, 0.0, 0.0],
                     [nan, nan, nan],      # no class with both changes: cev() raises -> NaN
                     [math.inf, 0.0, 1.0]])  # an inf change: cev() refuses -> NaN
    dfnr = np.array([[0.0, 20.0, 5.0],
                     [0.0, 0.0, 0.0],
                     [1.0, 2.0, 3.0],
                     [0.0, 0.0, 1.0]])
    c, s = _model_bias(dfpr, dfnr)
    assert c[0] == 100.0 and c[0] == M.cev(dfpr[0], dfnr[0]).value
    assert s[0] == M.sde(dfpr[0], dfnr[0]).value
    assert math.isclose(s[0], (10 + 30) / 2 / math.sqrt(2), rel_tol=1e-12)  # hand: mean |dFPR - dFNR| / sqrt 2
    assert c[1] == M.cev(dfpr[1], dfnr[1]).value and s[1] == M.sde(dfpr[1], dfnr[1]).value
    assert np.isnan(c[2:]).all() and np.isnan(s[2:]).all()
