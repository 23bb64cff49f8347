"""Quantize a model with int8_static on the CPU path this process was started with and check its arithmetic.

Run by ``test_quantize_cpu_paths.py`` in a fresh process per path, because
torch, fbgemm and oneDNN pick their vector unit once, at start-up, from the
CPU or from ``ATEN_CPU_CAPABILITY``, ``FBGEMM_ENABLE_INSTRUCTIONS`` and
``ONEDNN_MAX_CPU_ISA``::

    python -m tests.jobs.int8_cpu_probe inputs.pt result.json [engine]

``inputs.pt`` holds a smallcnn's float state dict, calibration batches and
named input sets (inside and far beyond the calibrated range). The result
holds, per engine and input set, each hidden int8 layer's largest distance
from the int64 formula (in output quanta) and its share of exact outputs,
the classifier's largest relative distance from its formula, and the logits.
"""

from __future__ import annotations

import json
import sys

import torch

from compbias.jobs import build_model
from compbias.jobs.quantize import Int8StaticLayer, activation_qmax, quantize_model
from tests.jobs import int8_reference


def probe(data: dict, engine: str | None) -> dict:
    model = build_model("smallcnn", 10, tuple(data["input_shape"]), seed=0)
    model.load_state_dict(data["state"])
    model.eval()
    q, info = quantize_model(model, "int8_static", calibration=data["calibration"], engine=engine)
    record = info["quantization"]
    qmax = activation_qmax(record["engine"])
    out = {"engine": record["engine"], "range": record["activation"]["range"], "sets": {}}
    for name, x in data["inputs"].items():
        seen: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0]))
                 for n, m in q.named_modules() if isinstance(m, (Int8StaticLayer,)) or n == "fc"]
        with torch.no_grad():
            logits = q(x)
        for h in hooks:
            h.remove()
        layers = {}
        for layer_name, layer_input in seen.items():
            if layer_name == "fc":
                continue
            expected, got = int8_reference.hidden_layer(q.get_submodule(layer_name), layer_input, qmax)
            diff = (expected - got).abs()
            quant = q.get_submodule(layer_name).quant
            unclamped = torch.round(layer_input.double() / float(quant.scale)) + int(quant.zero_point)
            layers[layer_name] = {"max_quanta": int(diff.max()), "exact": float((diff == 0).double().mean()),
                                  "inputs_beyond_grid": float((unclamped > qmax).double().mean())}
        fc_expected = int8_reference.float_output_layer(q.fc, seen["fc"], qmax)
        with torch.no_grad():
            fc_got = q.fc(seen["fc"]).double()
        out["sets"][name] = {
            "layers": layers,
            "fc_relative": float((fc_got - fc_expected).abs().max() / max(1.0, float(fc_expected.abs().max()))),
            "logits": logits.tolist(),
        }
    return out


def main(argv: list[str]) -> int:
    data = torch.load(argv[0], weights_only=True)
    torch.set_num_threads(1)
    engines = argv[2:] or [None]
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "engines": {str(e): probe(data, e) for e in engines}}
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
