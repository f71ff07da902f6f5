"""`train_online`'s schedule with stand-ins for the agent, the data, the collector and the supervisor:
how many updates each collected batch buys, and when the evaluations fall."""

import pytest
from tensordict import TensorDict

from cqlsac.pipeline.config import OnlineConfig
from cqlsac.pipeline.loops import train_online

FRAMES, PER_BATCH, READY_AT = 30, 3, 9  # updates start with the batch that brings the 9th frame


class CountingAgent:
    def __init__(self):
        self.updates = 0

    def update(self, batch):
        self.updates += 1
        return TensorDict({}, [])


class RecordingData:
    """Ready from `READY_AT` frames; `sample` records the progress each update was drawn at."""

    def __init__(self):
        self.frames, self.progress = 0, []

    def add(self, frames):
        self.frames += frames.numel()

    def ready(self, frames_collected):
        return frames_collected >= READY_AT

    def sample(self, progress):
        self.progress.append(progress)
        return TensorDict({}, [])


class Batches:
    def __init__(self, frames):
        self.batches = [TensorDict({}, [PER_BATCH]) for _ in range((FRAMES - frames) // PER_BATCH)]

    def __iter__(self):
        return iter(self.batches)

    def shutdown(self):
        pass


class NoSupervision:
    def restore(self):
        return {}

    def check(self, metrics, step):
        pass

    def tick(self, step, progress, final=False):
        pass


class NoLog:
    def log(self, prefix, metrics, step):
        pass


def updates_after_each_batch(utd_ratio: float) -> tuple[list[float], list[int]]:
    """The progress (frames / budget) of every update, and the frames at every evaluation."""
    data = RecordingData()
    schedule = OnlineConfig(frames=FRAMES, frames_per_batch=PER_BATCH, utd_ratio=utd_ratio, eval_every=15)
    evaluations = train_online(CountingAgent(), data, Batches, schedule=schedule, evaluate=lambda: 0.0, log=NoLog(),
                               supervisor=NoSupervision(), desc="test")
    evaluated_at = [frames for frames, _ in evaluations]
    return data.progress, evaluated_at


@pytest.mark.parametrize("utd_ratio, per_batch_from_ready", [
    (1.0, [3] * 8),
    (2.0, [6] * 8),
    (0.5, [1, 2, 1, 2, 1, 2, 1, 2]),  # 1.5 owed a batch: the half carries over to the next one
    (1 / 3, [1] * 8),
])
def test_each_batch_buys_utd_ratio_updates_per_frame_once_the_data_is_ready(utd_ratio, per_batch_from_ready):
    progress, evaluated_at = updates_after_each_batch(utd_ratio)
    batch_frames = range(READY_AT, FRAMES + 1, PER_BATCH)  # 9, 12, ..., 30: the batches after the data is ready
    expected = [frames / FRAMES for frames, n in zip(batch_frames, per_batch_from_ready) for _ in range(n)]
    assert progress == pytest.approx(expected)
    assert len(progress) == round(utd_ratio * (FRAMES - READY_AT + PER_BATCH))  # 24 frames' worth in all
    assert evaluated_at == [15, 30]

