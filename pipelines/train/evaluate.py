"""Old import path of the target-domain evaluation, which lives in :mod:`dynamix_core.evaluation.target`.
Kept only while the training workers still import it from here; new code imports the new path."""

from dynamix_core.evaluation.target import TargetSet, embed_images, evaluate_target  # noqa: F401
