"""Data Sampling Module (SPEC 2.2 step 3, 2.3c): mixed multi-camera + single-camera batches.

* :mod:`.config` - :class:`SamplerConfig` (P_m, K_m, V, G, K_s, buffer policy, curriculum);
* :mod:`.schedule` - the batch shape at a step (fixed batch size, schedulable ratio and G; or videos added on top);
* :mod:`.multicam` - P x K identities, uniform over source datasets, spread over cameras;
* :mod:`.singlecam` - V videos x G identities x K images from a bounded buffer of streamed videos;
* :mod:`.mixed` - :class:`MixedBatchSampler`, one :class:`BatchPlan` per step, resumable;
* :mod:`.unlabeled` - :class:`UnlabeledImageSampler`, single images spread over videos (pre-training).
"""

from dynamix_core.sampling.config import SamplerConfig, ScheduleBreakpoint
from dynamix_core.sampling.mixed import BatchPlan, MixedBatchSampler
from dynamix_core.sampling.multicam import MultiCameraSampler
from dynamix_core.sampling.schedule import BatchShape, shape_at, split_batch
from dynamix_core.sampling.singlecam import SingleCameraSampler, VideoSamples, VideoStream, partition_stream
from dynamix_core.sampling.unlabeled import UnlabeledImageSampler

__all__ = [
    "BatchPlan",
    "BatchShape",
    "MixedBatchSampler",
    "MultiCameraSampler",
    "SamplerConfig",
    "ScheduleBreakpoint",
    "SingleCameraSampler",
    "UnlabeledImageSampler",
    "VideoSamples",
    "VideoStream",
    "partition_stream",
    "shape_at",
    "split_batch",
]
