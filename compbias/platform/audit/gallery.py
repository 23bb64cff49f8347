"""Images of the top CIE examples, for the human-review gallery.

Images come from the dataset the study file describes: files under
``dataset.root`` when the predictions carry a ``path`` column, otherwise the
test split (:class:`~compbias.platform.audit.studyfile.TestSplit`, loaded once
per audit; ``test[i]`` is the example whose ``example_id`` is ``i``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from compbias.platform.audit.studyfile import TestSplit


class GalleryUnavailable(Exception):
    """The images cannot be loaded; the message says why."""


def load_images(split: TestSplit, example_ids: list[int], frame: pd.DataFrame | None = None) -> list[np.ndarray]:
    """Load test images by example id.

    Parameters
    ----------
    split : TestSplit
        The study's test split (its ``dataset`` section names the data).
    example_ids : list of int
    frame : pandas.DataFrame, optional
        Test frame with ``example_id`` and possibly ``path``.

    Returns
    -------
    list of numpy.ndarray
        ``(C, H, W)`` or ``(H, W, C)`` float arrays in [0, 1].

    Raises
    ------
    GalleryUnavailable
    """
    dataset = split.dataset
    root = dataset.root if dataset is not None else None
    if frame is not None and "path" in frame.columns and root:
        from PIL import Image

        paths = frame.set_index("example_id")["path"]
        out = []
        for i in example_ids:
            p = Path(root) / str(paths.loc[i])
            try:
                with Image.open(p) as im:
                    out.append(np.asarray(im.convert("RGB"), float).transpose(2, 0, 1) / 255.0)
            except OSError as exc:
                raise GalleryUnavailable(f"cannot read image {p}: {exc}") from exc
        return out
    if dataset is None or "kind" not in dataset.model_fields_set:
        raise GalleryUnavailable("the study file names no dataset kind")
    kind = dataset.kind
    try:
        bundle = split.bundle()
    except Exception as exc:
        raise GalleryUnavailable(f"cannot load dataset {kind!r}: {type(exc).__name__}: {exc}") from exc
    n = len(bundle.test)
    if frame is not None and len(frame) != n:
        raise GalleryUnavailable(
            f"the {kind} test split has {n} examples but the predictions have {len(frame)}; "
            "the study file does not describe the data these models were evaluated on"
        )
    out = []
    for i in example_ids:
        if not 0 <= int(i) < n:
            raise GalleryUnavailable(f"example_id {i} is outside the {kind} test split (0..{n - 1})")
        x, y = bundle.test[int(i)]
        if frame is not None:
            want = int(frame.loc[frame["example_id"] == int(i), "label"].iloc[0])
            if int(y) != want:
                raise GalleryUnavailable(f"example_id {i} has label {y} in the dataset but {want} in the predictions")
        out.append(np.asarray(x, float))
    return out
