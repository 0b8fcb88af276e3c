"""SynthReID: the procedural synthetic person re-identification data set (SPEC 1.4).

Writes the real on-disk formats - Market-1501 folders for the multi-camera source sets and the
held-out target domain, a LUPerson-NL LMDB store with tracker noise and ground truth for the
single-camera set - so the real parsers are exercised end to end. Deterministic by seed.

    from dynamix_core.data.synth import SynthConfig, generate
    summary = generate(SynthConfig(seed=0), "data/synthreid")
"""

from dynamix_core.data.synth.config import SynthConfig
from dynamix_core.data.synth.build import MANIFEST, generate

__all__ = ["MANIFEST", "SynthConfig", "generate"]
