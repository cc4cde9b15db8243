"""Reading what a run wrote to TensorBoard: the hparams plugin data (HParams tab)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def hparams_of(folder: Path) -> tuple[dict, list[str]]:
    """The (hyperparameters, metric names) of the hparams plugin data in an event folder."""
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    data = [plugin_data_pb2.HParamsPluginData.FromString(raw) for raw in content.values()]
    start = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    experiment = next(d.experiment for d in data if d.HasField("experiment"))
    params = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    return params, [m.name.tag for m in experiment.metric_infos]
