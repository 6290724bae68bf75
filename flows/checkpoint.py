"""Checkpoints of a training run: saved atomically beside the outputs, resumed only on a match."""

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flows import durable, storage
from flows.config import TrainConfig
from flows.errors import DataError
from lr_kernel import TrainState

if TYPE_CHECKING:
    from flows.backends import TrainingData

CHECKPOINT_NAME = ".lrflow-checkpoint.npz"


def checkpoint_path(config: TrainConfig) -> Path:
    """Beside the outputs; for a store in object storage (no rename), on this machine's
    disk under the stream cache's root, one file per store."""
    if storage.is_remote(config.output):
        from flows.backends import cache_root

        store = hashlib.blake2b(config.output.encode(), digest_size=8).hexdigest()
        return cache_root(config) / "checkpoints" / f"{store}{CHECKPOINT_NAME}"
    return Path(config.output) / CHECKPOINT_NAME


def checkpoint_key(data: "TrainingData", config: TrainConfig) -> dict[str, Any]:
    """What must be equal for a checkpoint to be continued: the data and the objective."""
    return {
        "input_fingerprint": data.fingerprint,
        "terms": list(data.plan.terms),
        "label": data.plan.label,
        "positive_label": str(data.plan.label_mapping.positive),
        "missing": config.missing,
        "weight": config.weight,
        "class_weight": config.class_weight,
        "standardize": config.standardize,
        "dtype": config.dtype,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "l2": config.l2,
        "validation_fraction": config.effective_validation_fraction,
        "validation_data": config.validation_data,
        "seed": config.seed,
    }


def save_checkpoint(path: Path, state: TrainState, key: dict[str, Any], run_id: str | None) -> None:
    """Write ``state`` to ``path`` whole or not at all (:mod:`flows.durable`)."""
    arrays = {k: np.asarray(v) for k, v in state.momentum.items() if isinstance(v, np.ndarray)}
    scalars = {k: float(v) for k, v in state.momentum.items() if not isinstance(v, np.ndarray)}
    meta = {
        "key": key,
        "run_id": run_id,
        "optimizer": state.optimizer,
        "iteration": state.iteration,
        "b": state.b,
        "momentum_scalars": scalars,
    }
    with durable.replacing(path) as handle:
        np.savez(
            handle,
            meta=np.array(json.dumps(meta)),
            w=state.w,
            cost_history=state.cost_history,
            gradient_norm_history=state.gradient_norm_history,
            **{f"momentum_{k}": v for k, v in arrays.items()},  # type: ignore[arg-type]
        )


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, Any], str | None]:
    """The state, key and run id saved at ``path``; DataError if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            momentum: dict[str, Any] = dict(meta["momentum_scalars"])
            momentum |= {
                name.removeprefix("momentum_"): saved[name]
                for name in saved.files
                if name.startswith("momentum_")
            }
            state = TrainState(
                optimizer=meta["optimizer"],
                iteration=int(meta["iteration"]),
                w=saved["w"],
                b=float(meta["b"]),
                cost_history=saved["cost_history"],
                gradient_norm_history=saved["gradient_norm_history"],
                momentum=momentum,
            )
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"checkpoint cannot be read ({error}); delete it or run without --resume", path=path
        ) from None
    return state, meta["key"], meta["run_id"]


def state_to_resume(
    path: Path, key: dict[str, Any], *, resume: bool, run_id: str | None
) -> TrainState | None:
    """The checkpoint to continue from, if any.

    A checkpoint is continued when asked (``--resume``) or when it was written by
    this same flow run (a Prefect retry of the fit task); otherwise a new run
    starts from scratch and overwrites it. One made for other data or another
    objective is refused, never silently continued.
    """
    if not path.exists():
        return None
    state, saved_key, saved_run = load_checkpoint(path)
    if not resume and (run_id is None or saved_run != run_id):
        return None
    differences = sorted(k for k in key.keys() | saved_key.keys() if key.get(k) != saved_key.get(k))
    if differences:
        raise DataError(
            f"checkpoint was made for a different {', '.join(differences)}; "
            "delete it or run without --resume",
            path=path,
        )
    return state
