"""A network's ONNX graph: exported with torch's dynamo exporter and checked against eager.

The graph takes ``features``, a float32 ``(rows, width)`` matrix with a dynamic row count,
and returns the network's raw outputs as ``raw``. A network that does not export, or whose
graph differs from eager on a seeded probe batch beyond :data:`PROBE_ATOL` and
:data:`PROBE_RTOL`, is not exported: it is served by eager, with the reason recorded.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stemma.components.platform.files import write_atomically

#: File name of the exported graph, beside the weights.
ONNX_FILE = "network.onnx"
#: Names of the graph's input and output.
INPUT_NAME = "features"
OUTPUT_NAME = "raw"
#: Rows of the seeded probe batch compared between eager and ONNX Runtime.
PROBE_ROWS = 256
PROBE_SEED = 20_241
#: Largest difference allowed between the graph's outputs and eager's:
#: ``|onnx - eager| <= PROBE_ATOL + PROBE_RTOL * |eager|`` on every output.
PROBE_ATOL = 1e-4
PROBE_RTOL = 1e-3
#: Longest reason kept (it becomes a tag).
MAX_REASON_CHARS = 500
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ExportReport:
    """What became of an export.

    Attributes:
        exported: whether the graph was written (it matched eager on the probe).
        reason: why not, in one line; None when exported.
        sha256: the sha256 of the file written; None when not exported.
    """

    exported: bool
    reason: str | None = None
    sha256: str | None = None


def export_onnx(network: nn.Module, width: int, path: Path) -> ExportReport:
    """Export ``network`` to ONNX at ``path`` when its graph matches eager on a probe batch.

    The network is not modified (a copy in eval mode is exported). Nothing is written
    when the export fails or the probe differs.

    Args:
        network: the network, taking a float32 ``(rows, width)`` matrix.
        width: the number of input columns.
        path: where to write the graph (atomically).

    Returns:
        The report; ``exported=False`` with a short reason when it was not written.
    """
    module = copy.deepcopy(network).eval().to("cpu")
    probe = np.random.default_rng(PROBE_SEED).standard_normal((PROBE_ROWS, width))
    probe = probe.astype(np.float32)
    try:
        with torch.inference_mode():
            expected = module(torch.from_numpy(probe)).float().numpy()
        payload = _export_bytes(module, width)
    except Exception as error:  # the exporter raises many types for unsupported modules
        return ExportReport(False, _reason("does not export to ONNX", error))
    try:
        found = _run_graph(payload, probe)
    except Exception as error:  # ONNX Runtime cannot load or run the exported graph
        return ExportReport(False, _reason("ONNX Runtime cannot run the exported graph", error))
    if found.shape != expected.shape:
        return ExportReport(
            False, f"the graph's outputs are shaped {found.shape}, eager's {expected.shape}"
        )
    close = np.isclose(found, expected, rtol=PROBE_RTOL, atol=PROBE_ATOL, equal_nan=True)
    if not close.all():
        gaps = np.abs(found - expected)[~close]
        worst = float(np.max(gaps)) if np.isfinite(gaps).all() else float("nan")
        return ExportReport(
            False,
            f"the graph differs from eager on the probe batch by up to {worst:.3g} "
            f"(allowed {PROBE_ATOL:g} + {PROBE_RTOL:g} x |eager|)",
        )
    write_atomically(Path(path), payload)
    return ExportReport(True, None, hashlib.sha256(payload).hexdigest())


def _export_bytes(module: nn.Module, width: int) -> bytes:
    example = torch.zeros((2, width), dtype=torch.float32)
    rows = torch.export.Dim("rows")
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: rows},),
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("the exporter returned no program")
    return program.model_proto.SerializeToString()


def _run_graph(payload: bytes, matrix: np.ndarray) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    (outputs, *_) = session.run(None, {session.get_inputs()[0].name: matrix})
    return np.asarray(outputs, dtype=np.float32)


def _reason(what: str, error: BaseException) -> str:
    """``what: <innermost error>: <its first line>``: the exporter wraps the real cause."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{what}: {type(error).__name__}: {first}".rstrip(": ")[:MAX_REASON_CHARS]


class _Silence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's warnings, log records and prints off the user's console for the
    duration of one export; the failure itself is reported as the export's reason."""
    handlers = {
        handler
        for name, logger in list(logging.Logger.manager.loggerDict.items())
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger)
        for handler in logger.handlers
    }
    quiet = _Silence()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        # torch.export prints the partial graph of a failed trace straight to stderr.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
